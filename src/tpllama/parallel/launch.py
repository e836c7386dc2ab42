"""Starting the ranks: one launch path for one rank, ranks tpllama spawns, and torchrun's ranks.

``launch(config)`` gives this process its ``Communicator``:

- under torchrun (or any env:// launcher) the process joins the ranks torchrun started;
- with world size 1 it is the one rank (``Communicator.single``: no process group at all);
- otherwise this process is rank 0 and starts ranks 1..N-1 as child processes
  (``python -m tpllama.parallel.worker``, ``parallel.early``: the tpllama command starts them
  before it imports torch). They meet rank 0 at a TCPStore listening on the loopback only, whose
  port rank 0 writes to their stdin, read the engine's config from it, and die with their parent
  (PR_SET_PDEATHSIG); a watchdog thread in rank 0 notices a worker that exits and ends every
  rank, so a collective blocked on the dead rank fails at once instead of waiting for the timeout.

Everything after ``launch`` is the same code on every rank.
"""

from __future__ import annotations

import contextlib
import datetime
import signal
import socket
import subprocess
import sys
import threading
import time

import torch

from .. import env
from ..config import EngineConfig
from .comm import Communicator, RankFailure
from .early import LOOPBACK, EarlyWorkers, hand_port, ranks_on_this_host, spawn_workers, threads_for

IDLE_TIMEOUT = datetime.timedelta(days=7)
LOOPBACK_INTERFACE = "lo"  # Linux's name for it
CONFIG_KEY = "tpllama/config"  # where spawned ranks find the engine's config in the store


def check_device(device: str | None, world_size: int) -> None:
    """Refuse, before any rank starts, a device this host cannot give every local rank: each
    rank on CUDA needs a GPU of its own (nccl refuses two ranks on one GPU)."""
    local = ranks_on_this_host(world_size)
    if device in (None, "auto"):
        return
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not understood; allowed: cpu, cuda, cuda:N, auto") from None
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; allowed: cpu, cuda, cuda:N, auto")
    if d.type != "cuda":
        return
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found == 0:
        raise ValueError(f"device {device!r} was asked for but no CUDA GPU is visible here; use --device cpu")
    if d.index is not None and local > 1:
        raise ValueError(f"device {device!r} names one GPU for {local} ranks; give --device cuda (rank i takes GPU i)")
    if d.index is not None and d.index >= found:
        raise ValueError(f"device {device!r}: this host has {found} GPU(s), cuda:0..cuda:{found - 1}")
    if local > found:
        raise ValueError(f"{local} ranks on this host need {local} GPUs (one each: nccl refuses two ranks on one "
                         f"GPU) but {found} is visible; allowed: world size <= {found} on CUDA, or --device cpu")


def pick_device(device: str | None, local_rank: int) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", local_rank)
    return d


def threads_per_rank(cfg: EngineConfig) -> int:
    """Torch threads of each rank on this host (``early.threads_for``)."""
    return threads_for(cfg.threads, cfg.world_size)


# ---------------------------------------------------------------------- the one launch path
def launch(cfg: EngineConfig, early: EarlyWorkers | None = None) -> tuple[Communicator, "Workers | None"]:
    """This process's communicator (see the module docstring), and the workers it started
    (``early``: workers the command started before importing torch, used if they fit ``cfg``)."""
    torch.set_num_threads(threads_per_rank(cfg))
    torch.manual_seed(0)  # the same seed in every process
    tr = env.torchrun_env()
    if tr is not None:
        if tr.world_size != cfg.world_size:
            raise ValueError(f"torchrun started {tr.world_size} processes but world_size={cfg.world_size} was asked for")
        return join(tr.rank, cfg, tr.local_rank), None
    if cfg.world_size == 1:
        return Communicator.single(pick_device(cfg.device, 0), cfg.timeout_s), None
    workers = Workers(cfg, early)
    try:
        comm = join(0, cfg, 0, store=workers.store)
    except Exception as err:
        workers.kill()
        raise RankFailure(f"could not start {cfg.world_size} ranks: {err}") from err
    workers.on_failure = comm.poison
    return comm, workers


class LocalStore:
    """The rendezvous store of ranks that all run on this host (tpllama launched them): a
    torch.distributed TCPStore listening on the loopback only (torch's own listens on every
    interface), on a port the kernel picks, bound before any worker starts."""

    def __init__(self, world_size: int, timeout_s: float, port: int | None = None):
        """Rank 0 (``port`` None): listen. A worker: connect to rank 0's ``port``."""
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        if port is not None:
            self.port = port
            self.store = dist.TCPStore(LOOPBACK, port, world_size, False, timeout)
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((LOOPBACK, 0))
        sock.listen(max(128, world_size))
        self.port = sock.getsockname()[1]
        self.store = dist.TCPStore(LOOPBACK, self.port, world_size, True, timeout, wait_for_workers=False,
                                   master_listen_fd=sock.detach())


@contextlib.contextmanager
def _gloo_interface(name: str | None):
    """gloo picks the interface its sockets listen on from GLOO_SOCKET_IFNAME when it builds a
    process group (else from the host name, which may resolve to a public address)."""
    import os

    if name is None:
        yield
        return
    old = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = old


def route_to(address: str) -> tuple[str, str]:
    """(interface name, our address on it) of the interface through which this host reaches
    ``address``: the kernel's routing table answers (a UDP socket "connected" to it sends
    nothing); the loopback for an address of this host."""
    import psutil

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((socket.gethostbyname(address), 9))
        except OSError as err:
            raise RankFailure(f"no route from this host to MASTER_ADDR {address} ({err}); check MASTER_ADDR and the "
                              f"network, or name the interface with --iface") from None
        ip = s.getsockname()[0]
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name, ip
    return LOOPBACK_INTERFACE, ip


def interface_address(name: str) -> str:
    """The IPv4 address of interface ``name`` (ValueError naming the interfaces there are)."""
    import psutil

    addrs = psutil.net_if_addrs()
    for a in addrs.get(name, []):
        if a.family == socket.AF_INET:
            return a.address
    raise ValueError(f"network interface {name!r} has no IPv4 address on this host; interfaces here: "
                     f"{', '.join(sorted(addrs))}")


def cluster_interface(cfg: EngineConfig, master_addr: str) -> tuple[str, str]:
    """(interface, address) this host's ranks use: GLOO_SOCKET_IFNAME, else ``--iface``, else the
    one that routes to MASTER_ADDR."""
    name = env.gloo_interface() or cfg.iface
    if name is not None:
        return name, interface_address(name)
    return route_to(master_addr)


def torchrun_store(tr: env.TorchrunEnv, ip: str, timeout_s: float):
    """The rendezvous store torchrun's ranks meet at: torchrun's agent's (every rank a client),
    or, without an agent store, one that rank 0 hosts on this host's cluster address only."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        if tr.agent_store or tr.rank != 0:
            return dist.TCPStore(tr.master_addr, tr.master_port, tr.world_size, False, timeout)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, tr.master_port))
        sock.listen(max(128, tr.world_size))
        return dist.TCPStore(ip, tr.master_port, tr.world_size, True, timeout, wait_for_workers=False,
                             master_listen_fd=sock.detach())
    except (RuntimeError, OSError) as err:
        raise RankFailure(f"rank {tr.rank} (host {socket.gethostname()}, {ip}) cannot reach the rendezvous store at "
                          f"MASTER_ADDR {tr.master_addr}:{tr.master_port} within {timeout_s:g} s ({err}); check "
                          f"MASTER_ADDR and MASTER_PORT, the firewall, and that host 0 is running") from None


def join(rank: int, cfg: EngineConfig, local_rank: int, store: LocalStore | None = None) -> Communicator:
    """Join the ranks' process groups and set up the fast collectives: through ``store`` (ranks
    tpllama launched itself, all on this host: every socket on the loopback), else through
    torchrun's MASTER_ADDR/MASTER_PORT, every socket on the interface that routes there. The fast
    collectives are connected first: that is the check that every rank reaches every other,
    failing within the timeout with the rank, address and port that could not be reached."""
    import torch.distributed as dist

    dev = pick_device(cfg.device, local_rank)
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    init_kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    if dev.type == "cpu" and cfg.collectives == "auto":  # build them (first use) before any rank waits for another
        from .. import kernels

        kernels.collectives(), kernels.tcp_collectives()
    if store is not None:
        iface = LOOPBACK_INTERFACE if sys.platform.startswith("linux") else None
        ip, base, local_world = LOOPBACK, store.store, cfg.world_size
    else:
        tr = env.torchrun_env()
        iface, ip = cluster_interface(cfg, tr.master_addr)
        base, local_world = torchrun_store(tr, ip, cfg.timeout_s), tr.local_world_size
    fast = None
    if dev.type == "cpu" and cfg.collectives == "auto":
        fast = fast_collectives(dist.PrefixStore("tpllama/fast", base), rank, cfg.world_size, local_rank, local_world,
                                ip, cfg.timeout_s)
    with _gloo_interface(iface):
        dist.init_process_group(backend=backend, rank=rank, world_size=cfg.world_size, timeout=timeout,
                                store=dist.PrefixStore("tpllama/pg", base), **init_kwargs)
        compute = dist.group.WORLD
        control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return Communicator(rank, cfg.world_size, local_rank, dev, cfg.timeout_s, control, compute, fast)


def fast_collectives(store, rank: int, world: int, local_rank: int, local_world: int, ip: str, timeout_s: float):
    """Our own collectives for CPU ranks (None where they cannot be built: every rank agrees):
    shared memory when every rank is on this host; a TCP mesh when every host runs one rank;
    shared memory inside each host and TCP between the hosts' first ranks otherwise."""
    from . import shm, tcp

    hosts = world // local_world
    host = rank // local_world
    built = None
    try:
        local = None
        if local_world > 1 and shm.available():
            key = f"shm/{host}"
            if local_rank == 0:
                store.set(key, shm.ShmCollectives.make_name())
            store.wait([key], datetime.timedelta(seconds=timeout_s))
            local = shm.ShmCollectives(store.get(key).decode(), local_rank, local_world, timeout_s=timeout_s)
        if hosts == 1:
            built = local
        elif tcp.available() and (local_world == 1 or local is not None):
            describe = lambda r: f"rank {r} (host {r // local_world})"  # noqa: E731
            if local_world == 1:
                fds = tcp.connect_mesh(store, "mesh", rank, list(range(world)), ip, timeout_s, describe)
                built = tcp.TcpCollectives(rank, fds, timeout_s)
            else:
                leaders = None
                if local_rank == 0:
                    members = [h * local_world for h in range(hosts)]
                    fds = tcp.connect_mesh(store, "leaders", rank, members, ip, timeout_s, describe)
                    leaders = tcp.TcpCollectives(host, fds, timeout_s)
                built = tcp.HostCollectives(local, leaders, local_rank, local_world, hosts)
    except tcp.MeshError as err:
        raise RankFailure(str(err)) from None
    except Exception as err:  # a rank that cannot build them: everybody falls back to gloo
        import logging

        logging.getLogger("tpllama").warning("fast collectives unavailable on rank %d (%s); using gloo", rank, err)
        built = None
    store.set(f"ok/{rank}", "1" if built is not None else "0")
    store.wait([f"ok/{r}" for r in range(world)], datetime.timedelta(seconds=timeout_s))  # also: all mapped
    if all(store.get(f"ok/{r}") == b"1" for r in range(world)):
        segment = built if isinstance(built, shm.ShmCollectives) else getattr(built, "local", None)
        if segment is not None and local_rank == 0:
            segment.unlink()  # nothing left in /dev/shm, whatever happens later
        return built
    if built is not None:
        built.close()
    return None


# ---------------------------------------------------------------------- ranks we start ourselves
def set_parent_death_signal() -> None:
    """Linux: get SIGKILL when the parent process dies, so no worker outlives its launcher."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Workers:
    """Ranks 1..N-1 as child processes of this (rank 0) process, and their watchdog. They meet
    rank 0 at ``store`` (loopback only), where they also find ``cfg``; their gloo sockets listen
    on the loopback only."""

    def __init__(self, cfg: EngineConfig, early: EarlyWorkers | None = None):
        self.world_size = cfg.world_size
        self.on_failure = None  # called from the watchdog thread when a worker dies
        self.store = LocalStore(cfg.world_size, cfg.timeout_s)
        self.store.store.set(CONFIG_KEY, cfg.to_json())
        self.failure: str | None = None
        self._closing = False
        threads = threads_per_rank(cfg)
        procs = early.take(cfg.world_size, threads) if early is not None else None
        self.procs: list[subprocess.Popen] = procs if procs is not None else spawn_workers(cfg.world_size, threads)
        hand_port(self.procs, self.store.port)
        self._watch = threading.Thread(target=self._watchdog, name="tpllama-watchdog", daemon=True)
        self._watch.start()

    @staticmethod
    def read_config(world_size: int, port: int) -> tuple[LocalStore, EngineConfig]:
        """A worker's side: connect to rank 0's store and read the engine's config there."""
        store = LocalStore(world_size, EngineConfig.timeout_s, port=port)
        cfg = EngineConfig.from_json(store.store.get(CONFIG_KEY).decode())
        return store, cfg

    def _watchdog(self) -> None:
        while not self._closing:
            for rank, p in enumerate(self.procs, start=1):
                code = p.poll()
                if code is not None and not self._closing:  # workers exit only when told to
                    self.failure = f"rank {rank} exited with code {code}"
                    if self.on_failure is not None:
                        self.on_failure()
                    self.kill()
                    return
            time.sleep(0.2)

    def pids(self) -> dict[int, int]:
        return {rank: p.pid for rank, p in enumerate(self.procs, start=1)}

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def close(self, grace_s: float = 10.0) -> None:
        """Wait for workers that were told to stop; kill any still running."""
        self._closing = True
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.kill()
