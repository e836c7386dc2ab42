"""Starting the ranks: one launch path for one rank, ranks tpllama spawns, and torchrun's ranks.

``launch(config)`` gives this process its ``Communicator``:

- under torchrun (or any env:// launcher) the process joins the ranks torchrun started;
- with world size 1 it is the one rank (``Communicator.single``: no process group at all);
- otherwise this process is rank 0 and starts ranks 1..N-1 as child processes
  (``python -m tpllama.parallel.worker``). They meet rank 0 at a TCPStore listening on the
  loopback only, read the engine's config from it, and die with their parent
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

IDLE_TIMEOUT = datetime.timedelta(days=7)
LOOPBACK = "127.0.0.1"
LOOPBACK_INTERFACE = "lo"  # Linux's name for it
CONFIG_KEY = "tpllama/config"  # where spawned ranks find the engine's config in the store


def ranks_on_this_host(world_size: int) -> int:
    """How many of the ``world_size`` ranks run on this host (torchrun says; else all of them)."""
    tr = env.torchrun_env()
    return tr.local_world_size if tr is not None else world_size


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
    """``cfg.threads``, else this host's cores shared among its ranks."""
    import os

    return cfg.threads or max(1, (os.cpu_count() or 1) // ranks_on_this_host(cfg.world_size))


# ---------------------------------------------------------------------- the one launch path
def launch(cfg: EngineConfig) -> tuple[Communicator, "Workers | None"]:
    """This process's communicator (see the module docstring), and the workers it started."""
    torch.set_num_threads(threads_per_rank(cfg))
    torch.manual_seed(0)  # the same seed in every process
    tr = env.torchrun_env()
    if tr is not None:
        if tr.world_size != cfg.world_size:
            raise ValueError(f"torchrun started {tr.world_size} processes but world_size={cfg.world_size} was asked for")
        return join(tr.rank, cfg, tr.local_rank, one_host=tr.local_world_size == tr.world_size), None
    if cfg.world_size == 1:
        return Communicator.single(pick_device(cfg.device, 0), cfg.timeout_s), None
    workers = Workers(cfg)
    try:
        comm = join(0, cfg, 0, one_host=True, store=workers.store, loopback_only=True)
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


def join(rank: int, cfg: EngineConfig, local_rank: int, one_host: bool, store: LocalStore | None = None,
         loopback_only: bool = False) -> Communicator:
    """Join the ranks' process groups: through ``store`` (ranks tpllama launched itself), else
    through MASTER_ADDR/MASTER_PORT (set by torchrun). ``loopback_only``: every rank runs on this
    host, so gloo listens on the loopback only."""
    import torch.distributed as dist

    dev = pick_device(cfg.device, local_rank)
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    init_kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    if store is not None:
        init_kwargs["store"] = store.store
    with _gloo_interface(LOOPBACK_INTERFACE if loopback_only and sys.platform.startswith("linux") else None):
        dist.init_process_group(backend=backend, rank=rank, world_size=cfg.world_size, timeout=timeout, **init_kwargs)
        compute = dist.group.WORLD
        control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    comm = Communicator(rank, cfg.world_size, local_rank, dev, cfg.timeout_s, control, compute)
    comm.shm = _shared_memory(comm, one_host and cfg.shared_memory)
    return comm


def _shared_memory(comm: Communicator, wanted: bool):
    """Shared-memory collectives when every rank is a CPU process of this host and the
    extension builds (every rank must agree, so rank 0 decides and tells the others)."""
    import torch.distributed as dist

    from . import shm

    name = None
    if comm.rank == 0 and wanted and comm.device.type == "cpu" and shm.available():
        name = shm.ShmCollectives.make_name()
    name = comm.broadcast_object(name)
    if name is None:
        return None
    seg = None
    try:
        if comm.rank != 0 and not shm.available():
            raise RuntimeError("shared-memory collectives unavailable on this rank")
        seg = shm.ShmCollectives(name, comm.rank, comm.world_size, timeout_s=comm.timeout_s)
        ok = torch.ones(1)
    except Exception:
        ok = torch.zeros(1)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=comm.control)  # also: everybody has it mapped
    if comm.rank == 0 and seg is not None:
        seg.unlink()  # nothing left in /dev/shm, whatever happens later
    if ok.item() < 1:
        if seg is not None:
            seg.close()
        return None
    return seg


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

    def __init__(self, cfg: EngineConfig):
        import os

        self.world_size = cfg.world_size
        self.on_failure = None  # called from the watchdog thread when a worker dies
        self.store = LocalStore(cfg.world_size, cfg.timeout_s)
        self.store.store.set(CONFIG_KEY, cfg.to_json())
        self.failure: str | None = None
        self._closing = False
        # torch's env:// variables: where the store is and which rank each child is
        base = dict(os.environ, MASTER_ADDR=LOOPBACK, MASTER_PORT=str(self.store.port), WORLD_SIZE=str(cfg.world_size),
                    LOCAL_WORLD_SIZE=str(cfg.world_size), OMP_NUM_THREADS=str(threads_per_rank(cfg)))
        base.pop("TORCHELASTIC_RUN_ID", None)
        self.procs: list[subprocess.Popen] = [
            subprocess.Popen([sys.executable, "-m", "tpllama.parallel.worker"],
                             env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)))
            for rank in range(1, cfg.world_size)
        ]
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
