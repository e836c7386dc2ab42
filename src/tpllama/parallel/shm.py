"""Shared-memory collectives for the ranks of one host (CPU tensors), instead of gloo.

A gloo all-reduce of a tiny tensor costs ~50 us on an idle host and milliseconds on a busy one
(socket waits and context switches); a decode step needs ~60 of them. Here the ranks exchange
data through a POSIX shared-memory segment (``/dev/shm/<segment name>``) and synchronise with
atomic per-rank sequence counters; the waits spin briefly, then ``sched_yield()``, then sleep.
The protocol (double-buffered slots, one barrier per op) and the reasoning behind it are in
``kernels/shm_collectives.cpp``, a C++ extension built on first use like the kernels.

Usage (every rank of one host, same ``name``; rank 0 creates, the others open)::

    name = ShmCollectives.make_name()   # on rank 0; give it to the others (env, gloo)
    shm = ShmCollectives(name, rank, world_size)   # rank 0 creates the segment, others open it
                                                   # (they wait up to timeout_s for it to appear)
    dist.barrier(group)                            # everybody has it mapped ...
    shm.unlink()                                   # ... so rank 0 may drop the name right away:
                                                   # nothing can be left in /dev/shm after a crash
    shm.all_reduce(x); shm.broadcast(header, src=0, timeout_s=None); ...
    shm.close()                                    # rank 0 unlinks here if not done before

Every rank must issue the same sequence of collectives (with the same sizes), as with any
collective library; a mismatch is detected and raises. All ops raise ``RuntimeError`` on
timeout (naming the rank waited for), when a rank's process is gone, or when the segment was
poisoned (``poison()`` by any rank, e.g. from rank 0's watchdog thread when a worker died, or
``ShmCollectives.poison_by_name(name)`` from another process); after any such error the
segment is poisoned for good and every rank must stop using it. The waits release the GIL.

Results are bit-identical on all ranks: every rank sums all slots itself in rank order
0..N-1 (float32 accumulation for bf16/fp16). ``available()`` says whether the extension could
be built (set ``TPLLAMA_NO_SHM=1`` to disable it); callers fall back to gloo otherwise.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import uuid

import torch

from .. import kernels

__all__ = ["ShmCollectives", "available", "get", "cleanup_stale"]

log = logging.getLogger(__name__)

PREFIX = "tpllama-"
SHM_DIR = "/dev/shm"


def get():
    """The compiled extension, or None (not Linux, no compiler, build failure, TPLLAMA_NO_SHM=1)."""
    return kernels.collectives()


def available() -> bool:
    return get() is not None


def _segment_name(name: str) -> str:
    return name if name.startswith(PREFIX) else PREFIX + name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(min_age_s: float = 60.0) -> list[str]:
    """Unlink ``/dev/shm/tpllama-*`` segments whose creating process is gone (left by a crash
    before ``unlink()``), and never-initialised ones older than ``min_age_s``. Returns the names."""
    ext = get()
    removed = []
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return removed
    magic = ext.MAGIC if ext is not None else None
    for fn in entries:
        if not fn.startswith(PREFIX):
            continue
        path = os.path.join(SHM_DIR, fn)
        try:
            with open(path, "rb") as f:
                head = f.read(48)
            st = os.stat(path)
        except OSError:
            continue
        if len(head) < 48:
            stale = time.time() - st.st_mtime > min_age_s
        else:
            m, pid = struct.unpack_from("<Q", head, 0)[0], struct.unpack_from("<q", head, 40)[0]
            if m == 0:
                stale = time.time() - st.st_mtime > min_age_s
            else:
                stale = magic is not None and m == magic and pid > 0 and not _pid_alive(pid)
        if stale:
            try:
                os.unlink(path)
                removed.append(fn)
            except OSError:
                pass
    if removed:
        log.info("removed stale shared-memory segments: %s", ", ".join(removed))
    return removed


class ShmCollectives:
    """Collectives over a shared-memory segment for ranks of one host (CPU tensors).

    ``ShmCollectives(name, rank, world_size, ...)``: rank 0 creates ``/dev/shm/tpllama-<name>``
    (``name`` must be unique per run: ``make_name(port)``; stale segments of dead runs are swept
    first), ranks 1..N-1 open it, waiting up to ``timeout_s`` for rank 0 to create it, so no
    barrier is needed before opening; a barrier *after* everybody opened lets rank 0 ``unlink()``
    early. Memory: ``2 * world_size * slot_bytes`` (pages are touched only as used).

    ``timeout_s`` bounds every wait of ``all_reduce``/``all_gather``/``barrier`` and is the
    default of ``broadcast`` (which takes ``timeout_s=None`` to wait forever, for idle workers).
    ``spin_us``/``yield_us``/``sleep_us``/``idle_ms``: a waiter spins for ``spin_us``, then
    calls ``sched_yield()`` until ``yield_us``, then sleeps ``sleep_us`` per check, and 1 ms
    per check once it has waited ``idle_ms``. ``check_pids``: a waiter checks every ~100 ms
    that the process of the rank it waits for still exists (same PID namespace assumed).
    """

    def __init__(self, name: str, rank: int, world_size: int, slot_bytes: int = 8 << 20,
                 timeout_s: float = 60.0, *, create: bool | None = None, check_pids: bool = True,
                 spin_us: float = 5.0, yield_us: float = 200.0, sleep_us: float = 50.0,
                 idle_ms: float = 50.0, sweep_stale: bool = True):
        ext = get()
        if ext is None:
            raise RuntimeError("tpllama shared-memory collectives are not available (see shm.available())")
        if create is None:
            create = rank == 0
        self.name = _segment_name(name)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.timeout_s = float(timeout_s)
        self.owner = bool(create)
        if create and sweep_stale:
            cleanup_stale()
        self._seg = ext.Segment(self.name, self.rank, self.world_size, int(slot_bytes), bool(create),
                                float(timeout_s), bool(check_pids))
        self._seg.set_wait(float(spin_us), float(yield_us), float(sleep_us), float(idle_ms))
        self.slot_bytes = self._seg.slot_bytes  # rounded up to 4 KiB

    @classmethod
    def create(cls, name: str, world_size: int, slot_bytes: int = 8 << 20, timeout_s: float = 60.0,
               **kw) -> "ShmCollectives":
        """Rank 0's constructor (same as ``ShmCollectives(name, 0, world_size, ...)``)."""
        return cls(name, 0, world_size, slot_bytes, timeout_s, create=True, **kw)

    @staticmethod
    def make_name() -> str:
        """A fresh segment name: ``tpllama-<pid>-<uuid>``."""
        return f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"

    @staticmethod
    def poison_by_name(name: str) -> bool:
        """Poison the segment ``name`` from any process. False if there is no such segment."""
        ext = get()
        return bool(ext is not None and ext.poison_by_name(_segment_name(name)))

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """In-place sum over the ranks (rank order), returns ``x``. float32/bf16/fp16 (float
        accumulation), also float64/int64/int32; any shape, contiguous, CPU; chunked by slot."""
        return self._seg.all_reduce(x, self.timeout_s)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[world_size, *x.shape]`` of every rank's ``x`` (same shape and dtype on every rank)."""
        return self._seg.all_gather(x, self.timeout_s)

    def broadcast(self, x: torch.Tensor, src: int = 0, timeout_s: float | None = ...) -> torch.Tensor:
        """In place: ``x`` of rank ``src`` on every rank (any dtype, same shape everywhere).
        ``src`` returns as soon as the data is published. ``timeout_s``: ``...`` = the
        instance's, ``None`` = wait forever (1 ms sleeps once idle; still raises on poison)."""
        if timeout_s is ...:
            timeout_s = self.timeout_s
        return self._seg.broadcast(x, int(src), -1.0 if timeout_s is None else float(timeout_s))

    def barrier(self) -> None:
        self._seg.barrier(self.timeout_s)

    # ------------------------------------------------------------------ failure handling, lifetime

    def poison(self) -> None:
        """Make every rank's current and future waits on this segment raise at once."""
        if not self._seg.closed:
            self._seg.poison(1, -1)

    @property
    def poisoned(self) -> bool:
        return bool(self._seg.poisoned())

    @property
    def closed(self) -> bool:
        return self._seg.closed

    def unlink(self) -> None:
        """Rank 0: remove the segment's name now (once every rank has opened it). Idempotent;
        a no-op on the other ranks."""
        self._seg.unlink()

    def close(self) -> None:
        """Unmap (and on rank 0 unlink, if not done yet). Idempotent. No other thread may be
        inside an op of this object at the time."""
        self._seg.close()

    def __enter__(self) -> "ShmCollectives":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ShmCollectives({self.name!r}, rank={self.rank}, world_size={self.world_size}, "
                f"slot_bytes={self.slot_bytes}, closed={self.closed})")
