"""Several hosts on one machine, for tests and benchmarks across hosts.

Each host is a Linux network namespace with one interface (``eth0``) plugged into a bridge that
lives in a namespace of its own (the "switch"), so nothing touches the machine's own network.
Addresses are link-local (169.254.S.1, .2, ...: never routed off the machine), each host's
processes run pinned to its own cores (``taskset``), and everything made here is removed on exit
(processes killed, namespaces deleted). Needs root and iproute2; ``available()`` says whether this
machine can, and why not.

    with Hosts(2, cores=["0", "1"]) as hosts:
        procs = [h.popen(["torchrun", ...]) for h in hosts]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

PREFIX = "tpl"  # namespace names: tpl<pid>s (the switch), tpl<pid>h<i> (host i)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def available() -> tuple[bool, str]:
    """(True, "") when network namespaces can be made here; else (False, why)."""
    if shutil.which("ip") is None:
        return False, "iproute2's `ip` is not installed"
    if shutil.which("taskset") is None:
        return False, "`taskset` (util-linux) is not installed"
    if os.geteuid() != 0:
        return False, "making network namespaces needs root"
    name = f"{PREFIX}{os.getpid()}probe"
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, OSError) as err:
        return False, f"`ip netns add` failed: {getattr(err, 'stderr', '') or err}".strip()
    _ip("netns", "del", name, check=False)
    return True, ""


def remove_stale() -> list[str]:
    """Delete namespaces of earlier runs whose process is gone (a test killed mid-way)."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        digits = name[len(PREFIX):].split("h")[0].split("s")[0].split("probe")[0]
        if not name.startswith(PREFIX) or not digits.isdigit():
            continue
        if not Path(f"/proc/{digits}").exists():
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


class Host:
    """One emulated host: a namespace, its address on the bridge, its cores."""

    def __init__(self, index: int, netns: str, address: str, cores: str | None):
        self.index, self.netns, self.address, self.cores = index, netns, address, cores
        self.iface = "eth0"
        self.procs: list[subprocess.Popen] = []

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` as run on this host (in its namespace, on its cores)."""
        pin = ["taskset", "-c", self.cores] if self.cores is not None else []
        return ["ip", "netns", "exec", self.netns, *pin, *argv]

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(self.command(argv), **kw)
        self.procs.append(p)
        return p

    def run(self, argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), timeout=timeout, **kw)

    def set_link(self, up: bool) -> None:
        """Plug this host's cable in or out (its processes keep running)."""
        _ip("-n", self.netns, "link", "set", self.iface, "up" if up else "down")

    def pids(self) -> list[int]:
        """Every process running in this host's namespace."""
        out = _ip("netns", "pids", self.netns, check=False).stdout.split()
        return [int(p) for p in out if p.isdigit()]


class Hosts:
    """``n`` emulated hosts joined by a bridge; see the module docstring. ``cores``: one taskset
    list per host (e.g. ["0", "1"]), or None to leave the processes unpinned."""

    def __init__(self, n: int, cores: list[str] | None = None):
        if cores is not None and len(cores) != n:
            raise ValueError(f"{n} hosts need {n} core lists, got {cores!r}")
        self.n = n
        pid = os.getpid()
        self.switch = f"{PREFIX}{pid}s"
        subnet = 1 + pid % 250  # 169.254.0.x and 169.254.255.x are reserved
        self.hosts = [Host(i, f"{PREFIX}{pid}h{i}", f"169.254.{subnet}.{i + 1}", cores[i] if cores else None)
                      for i in range(n)]

    def __iter__(self):
        return iter(self.hosts)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __enter__(self) -> "Hosts":
        remove_stale()
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for h in self.hosts:
                _ip("netns", "add", h.netns)
                _ip("link", "add", "name", h.iface, "netns", h.netns, "type", "veth", "peer", "name", f"p{h.index}",
                    "netns", self.switch)
                _ip("-n", self.switch, "link", "set", f"p{h.index}", "master", "br0")
                _ip("-n", self.switch, "link", "set", f"p{h.index}", "up")
                _ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", h.iface)
                _ip("-n", h.netns, "link", "set", h.iface, "up")
                _ip("-n", h.netns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process of every host, then delete the namespaces."""
        for h in self.hosts:
            for p in h.procs:
                if p.poll() is None:
                    p.kill()
            for pid in h.pids() if self._exists(h.netns) else []:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for h in self.hosts:
            for p in h.procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for name in [h.netns for h in self.hosts] + [self.switch]:
            if self._exists(name):
                _ip("netns", "del", name, check=False)

    @staticmethod
    def _exists(name: str) -> bool:
        return Path("/var/run/netns", name).exists() or Path("/run/netns", name).exists()


def main(argv: list[str] | None = None) -> int:
    """``python -m tpllama.bench.hosts --hosts 2 [--nproc 1] [--cores 0 1] -- TPLLAMA ARGS...``:
    run ``torchrun ... -m tpllama TPLLAMA ARGS`` on every emulated host (as the README's
    "Across hosts" does on real ones) and print host 0's output."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m tpllama.bench.hosts", description=main.__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--nproc", type=int, default=1, help="ranks per host (default 1)")
    p.add_argument("--cores", nargs="+", default=None, help="taskset core list per host (default: host i on core i)")
    p.add_argument("--port", type=int, default=29600)
    p.add_argument("--timeout", type=int, default=600, help="seconds to wait for the hosts (default 600)")
    p.add_argument("--module", default="tpllama", help="the module torchrun runs (default tpllama: its commands)")
    p.add_argument("tpllama", nargs=argparse.REMAINDER, help="-- then the tpllama command and its flags")
    a = p.parse_args(argv)
    args = a.tpllama[1:] if a.tpllama[:1] == ["--"] else a.tpllama
    ok, why = available()
    if not ok:
        print(f"cannot emulate hosts here: {why}", file=sys.stderr)
        return 2
    ncpu = len(os.sched_getaffinity(0))
    cores = a.cores or [str(i % ncpu) for i in range(a.hosts)]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    with Hosts(a.hosts, cores=cores) as hosts:
        procs = []
        for h in hosts:
            cmd = [torchrun, "--nnodes", str(a.hosts), "--node_rank", str(h.index), "--master_addr", hosts[0].address,
                   "--master_port", str(a.port), "--nproc_per_node", str(a.nproc), "--rdzv_conf", "timeout=120",
                   "-m", a.module, *args]
            procs.append(h.popen(cmd, stdout=None if h.index == 0 else subprocess.DEVNULL,
                                 stderr=None if h.index == 0 else subprocess.DEVNULL))
        print(f"{a.hosts} hosts ({', '.join(f'{h.address} on cores {h.cores}' for h in hosts)}), "
              f"{a.nproc} rank(s) each: {a.module} {' '.join(args)}", file=sys.stderr, flush=True)
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=a.timeout))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(124)
    return max(codes)


if __name__ == "__main__":
    import sys

    sys.exit(main())
