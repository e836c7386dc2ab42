"""Ranks: start-up (our own launcher or torchrun), process groups, collectives, failure handling.

Two process groups: *control* (always gloo, CPU tensors; rank 0 broadcasts commands on it and
idle workers wait on it with a long timeout) and *compute* (gloo on CPU, nccl on CUDA; the
per-layer all-reduces, with a bounded timeout so a stuck rank cannot hang the others).

When we launch the ranks ourselves, the calling process is rank 0 and ranks 1..N-1 are child
processes running ``python -m tpllama.worker``; they die with their parent (PR_SET_PDEATHSIG),
and a watchdog thread in rank 0 kills every worker as soon as one of them exits abnormally, so a
collective blocked on the dead rank fails at once instead of waiting for the timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from .model import identity

DEFAULT_TIMEOUT_S = 60.0
IDLE_TIMEOUT = datetime.timedelta(days=7)


# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class RankFailure(RuntimeError):
    """Another rank died, hung past the timeout, or a collective failed."""


@dataclasses.dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control: object  # ProcessGroup (gloo)
    compute: object  # ProcessGroup (gloo or nccl)
    timeout_s: float
    shm: object = None  # shm.ShmCollectives when every rank is a CPU process of this host

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:  # a cut of one part: nothing to sum (and no kernel to launch on a GPU)
            return x
        if self.shm is not None:
            return self.shm.all_reduce(x)
        dist.all_reduce(x, group=self.compute)
        return x

    def _all_gather(self, local: torch.Tensor) -> torch.Tensor:
        """[world_size, *local.shape]"""
        if self.shm is not None:
            return self.shm.all_gather(local)
        out = torch.empty((self.world_size * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
        _all_gather_single(out, local, group=self.compute)
        return out.view(self.world_size, *local.shape)

    def gather_vocab(self, parts: list[int]):
        """A callable concatenating each rank's logits slice [..., V_r] into [..., sum V_r]."""
        if self.world_size == 1:
            return identity
        widest = max(parts)

        def gather(local: torch.Tensor) -> torch.Tensor:
            pad = widest - local.shape[-1]
            if pad:
                local = torch.nn.functional.pad(local, (0, pad))
            out = self._all_gather(local.contiguous())
            return torch.cat([out[r, ..., : parts[r]] for r in range(self.world_size)], dim=-1)

        return gather

    def broadcast(self, x: torch.Tensor, src: int = 0, idle: bool = False) -> torch.Tensor:
        """Rank ``src``'s ``x`` on every rank. ``idle``: a worker waiting for its next command
        waits without a time limit; everything else is bounded by the timeout."""
        if self.shm is not None:
            return self.shm.broadcast(x, src=src, timeout_s=None if idle else self.timeout_s)
        work = dist.broadcast(x, src=src, group=self.control, async_op=True)
        if idle:
            work.wait()
        elif not work.wait(timeout=datetime.timedelta(seconds=self.timeout_s)):
            raise RankFailure(f"broadcast timed out after {self.timeout_s:g} s")
        return x

    def poison(self) -> None:
        """Make every rank's pending shared-memory wait fail now (a rank died)."""
        if self.shm is not None:
            self.shm.poison()

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a broken group cannot always be torn down cleanly
                pass


def local_world_size(world_size: int) -> int:
    """How many of the ``world_size`` ranks run on this host (torchrun says; else all of them)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if launched_by_torchrun() else world_size


def check_device(device: str | None, world_size: int) -> None:
    """Refuse, before any rank starts, a device this host cannot give every local rank: each
    rank on CUDA needs a GPU of its own (nccl refuses two ranks on one GPU)."""
    ranks_on_this_host = local_world_size(world_size)
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
    if d.index is not None and ranks_on_this_host > 1:
        raise ValueError(f"device {device!r} names one GPU for {ranks_on_this_host} ranks; give --device cuda "
                         f"(rank i takes GPU i)")
    if d.index is not None and d.index >= found:
        raise ValueError(f"device {device!r}: this host has {found} GPU(s), cuda:0..cuda:{found - 1}")
    if ranks_on_this_host > found:
        raise ValueError(f"{ranks_on_this_host} ranks on this host need {ranks_on_this_host} GPUs (one each: nccl "
                         f"refuses two ranks on one GPU) but {found} is visible; allowed: world size <= {found} on "
                         f"CUDA, or --device cpu")


def pick_device(device: str | None, local_rank: int) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", local_rank)
    return d


LOOPBACK = "127.0.0.1"
LOOPBACK_INTERFACE = "lo"  # Linux's name for it


class LocalStore:
    """The rendezvous store of ranks that all run on this host (tpllama launched them): a
    torch.distributed TCPStore listening on the loopback only (torch's own listens on every
    interface), on a port the kernel picks, bound before any worker starts."""

    def __init__(self, world_size: int, timeout_s: float, port: int | None = None):
        """Rank 0 (``port`` None): listen. A worker: connect to rank 0's ``port``."""
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


def init_ranks(rank: int, world_size: int, device: str | None, timeout_s: float,
               local_store: LocalStore | None = None, loopback_only: bool = False) -> DistContext:
    """Join the ranks' process groups: through ``local_store`` (ranks tpllama launched itself),
    else through MASTER_ADDR/MASTER_PORT (set by torchrun).
    ``loopback_only``: every rank runs on this host, so gloo listens on the loopback only."""
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    dev = pick_device(device, local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    init_kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    if local_store is not None:
        init_kwargs["store"] = local_store.store
    with _gloo_interface(LOOPBACK_INTERFACE if loopback_only and sys.platform.startswith("linux") else None):
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout, **init_kwargs)
        compute = dist.group.WORLD
        control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    ctx = DistContext(rank, world_size, local_rank, dev, control, compute, timeout_s)
    ctx.shm = _shared_memory(ctx)
    return ctx


def one_host() -> bool:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) == int(os.environ.get("WORLD_SIZE", "1"))


def _shared_memory(ctx: DistContext):
    """Shared-memory collectives when every rank is a CPU process of this host and the
    extension builds (every rank must agree, so rank 0 decides and tells the others)."""
    from . import shm

    decision = [None]
    if ctx.rank == 0 and ctx.device.type == "cpu" and one_host() and shm.available():
        decision = [shm.ShmCollectives.make_name()]
    dist.broadcast_object_list(decision, src=0, group=ctx.control)
    name = decision[0]
    if name is None:
        return None
    seg = None
    try:
        if ctx.rank != 0 and not shm.available():
            raise RuntimeError("shared-memory collectives unavailable on this rank")
        seg = shm.ShmCollectives(name, ctx.rank, ctx.world_size, timeout_s=ctx.timeout_s)
        ok = torch.ones(1)
    except Exception:
        ok = torch.zeros(1)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=ctx.control)  # also: everybody has it mapped
    if ctx.rank == 0 and seg is not None:
        seg.unlink()  # nothing left in /dev/shm, whatever happens later
    if ok.item() < 1:
        if seg is not None:
            seg.close()
        return None
    return seg


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_parent_death_signal() -> None:
    """Linux: get SIGKILL when the parent process dies, so no worker outlives its launcher."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Workers:
    """Ranks 1..N-1 as child processes of this (rank 0) process, and their watchdog. They meet
    rank 0 at ``store`` (loopback only) and their gloo sockets listen on the loopback only."""

    def __init__(self, world_size: int, worker_args: list[str], threads: int | None, timeout_s: float):
        self.world_size = world_size
        self.on_failure = None  # called from the watchdog thread when a worker dies
        self.store = LocalStore(world_size, timeout_s)
        self.failure: str | None = None
        self._closing = False
        env = dict(os.environ, MASTER_ADDR=LOOPBACK, MASTER_PORT=str(self.store.port), WORLD_SIZE=str(world_size))
        env.pop("TORCHELASTIC_RUN_ID", None)
        self.procs: list[subprocess.Popen] = []
        for rank in range(1, world_size):
            wenv = dict(env, RANK=str(rank), LOCAL_RANK=str(rank))
            if threads:
                wenv["OMP_NUM_THREADS"] = str(threads)
            self.procs.append(
                subprocess.Popen([sys.executable, "-m", "tpllama.worker", *worker_args], env=wenv, start_new_session=False)
            )
        self._watch = threading.Thread(target=self._watchdog, name="tpllama-watchdog", daemon=True)
        self._watch.start()

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
