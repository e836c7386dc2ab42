"""Spawning ranks 1..N-1 of this host, possibly before this process (rank 0) has imported torch.

Importing torch takes 2-3 s on the machines tpllama runs on, and every spawned rank pays it again.
The ``tpllama`` command therefore starts its workers first thing, right after parsing its flags
(``EarlyWorkers``): they import torch and tpllama's engine while rank 0 does the same on another
core, then wait. Rank 0 starts its rendezvous store when it launches the ranks
(``launch.Workers``) and writes the store's port to each worker's stdin; only then does a worker
connect and read the engine's config. A worker whose stdin closes before a port arrives (rank 0
exited: bad input, Ctrl-C, a crash) exits at once, so a worker started early never outlives its
launcher, and waits without a timeout only while rank 0 is alive (cutting a large model first can
take minutes).

Nothing here imports torch.
"""

from __future__ import annotations

import os
import subprocess
import sys

from .. import env
from ..config import EngineConfig

LOOPBACK = "127.0.0.1"


def ranks_on_this_host(world_size: int) -> int:
    """How many of the ``world_size`` ranks run on this host (torchrun says; else all of them)."""
    tr = env.torchrun_env()
    return tr.local_world_size if tr is not None else world_size


def threads_for(threads: int | None, world_size: int) -> int:
    """``threads``, else the cores this process may run on shared among this host's ranks (the
    affinity mask, not the machine's core count: a process pinned to one core must not start two
    threads that spin against each other)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return threads or max(1, cores // ranks_on_this_host(world_size))


def spawn_workers(world_size: int, threads: int) -> list[subprocess.Popen]:
    """Start ranks 1..world_size-1 (``python -m tpllama.parallel.worker``), waiting for their
    store's port on stdin (``hand_port``)."""
    base = dict(os.environ, MASTER_ADDR=LOOPBACK, WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                OMP_NUM_THREADS=str(threads))
    for key in ("TORCHELASTIC_RUN_ID", "MASTER_PORT"):
        base.pop(key, None)
    return [subprocess.Popen([sys.executable, "-m", "tpllama.parallel.worker"], stdin=subprocess.PIPE,
                             env=dict(base, RANK=str(rank), LOCAL_RANK=str(rank)))
            for rank in range(1, world_size)]


def hand_port(procs: list[subprocess.Popen], port: int) -> None:
    """Tell every waiting worker where rank 0's store listens (a worker that already died is left
    to the watchdog, which reports its exit code)."""
    for p in procs:
        try:
            p.stdin.write(f"{port}\n".encode())
            p.stdin.close()
        except (BrokenPipeError, OSError):
            pass


def stop(procs: list[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """End workers that will not be used: close their stdin and kill those still running (before
    a port arrives a worker holds nothing worth a graceful exit), then reap them."""
    for p in procs:
        try:
            p.stdin.close()
        except OSError:
            pass
    for p in procs:
        if p.poll() is None:
            p.kill()
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass


class EarlyWorkers:
    """Workers started before rank 0 knows its full configuration. ``take`` hands them to the
    launch if the configuration turned out as the flags said (same world size and threads), else
    stops them (the launch then spawns its own)."""

    def __init__(self, world_size: int, threads: int | None):
        self.world_size = world_size
        self.threads = threads_for(threads, world_size)
        self.procs = spawn_workers(world_size, self.threads)

    @classmethod
    def for_config(cls, cfg: EngineConfig) -> "EarlyWorkers | None":
        """Workers for the ranks ``cfg`` asks this process to start (None: one rank, or torchrun
        starts them)."""
        if cfg.world_size <= 1 or env.torchrun_env() is not None:
            return None
        return cls(cfg.world_size, cfg.threads)

    def take(self, world_size: int, threads: int) -> list[subprocess.Popen] | None:
        procs, self.procs = self.procs, []
        if world_size == self.world_size and threads == self.threads:
            return procs
        stop(procs)
        return None

    def close(self) -> None:
        """Stop workers that were never handed to a launch (no-op after ``take``)."""
        stop(self.procs)
        self.procs = []

    def __enter__(self) -> "EarlyWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
