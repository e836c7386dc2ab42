"""The communicator: what a rank needs from the others, whatever started it.

``Communicator`` is one rank's view: its rank, the world size, its device, and the collectives the
engine uses (the model's all-reduce and logits gather, the runner's command broadcast, the
start-up exchanges of objects). One rank is ``Communicator.single(device)``: every collective is
the identity, so the code above never asks how many ranks there are.

Several ranks use two process groups: *control* (always gloo, CPU tensors; rank 0 broadcasts
commands on it and idle workers wait on it without a time limit) and *compute* (gloo on CPU, nccl
on CUDA: the per-layer all-reduces, bounded by the timeout so a stuck rank cannot hang the
others). CPU ranks use our own collectives instead of both (``fast``): shared memory among the
ranks of a host, a TCP mesh between hosts (``parallel.tcp``); every collective counts its calls,
wall time and bytes (``stats``) for the benchmark.
"""

from __future__ import annotations

import datetime
import time

import torch

from ..errors import RankFailure


def identity(x):
    return x


class Communicator:
    """One rank's collectives. Built by ``parallel.launch``; see the module docstring."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device, timeout_s: float,
                 control=None, compute=None, fast=None):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device
        self.timeout_s = timeout_s
        self.control = control  # ProcessGroup (gloo), None for one rank
        self.compute = compute  # ProcessGroup (gloo or nccl), None for one rank
        self.fast = fast  # ShmCollectives / TcpCollectives / HostCollectives for CPU ranks, else None
        self.calls = 0  # collectives issued during steps, their wall time and payload bytes
        self.seconds = 0.0
        self.bytes = 0

    @classmethod
    def single(cls, device: torch.device, timeout_s: float = 60.0) -> "Communicator":
        """One rank: nothing to exchange with anybody."""
        return cls(0, 1, 0, device, timeout_s)

    @property
    def backend(self) -> str | None:
        """What carries the collectives: "shared memory", "gloo", "nccl", or None for one rank."""
        if self.world_size == 1:
            return None
        if self.fast is not None:
            return {"ShmCollectives": "shared memory", "TcpCollectives": "tcp",
                    "HostCollectives": "shared memory + tcp"}[type(self.fast).__name__]
        import torch.distributed as dist

        return dist.get_backend(self.compute)

    # ------------------------------------------------------------------ the model's collectives
    def stats(self) -> dict:
        """Collectives issued so far: calls, wall seconds inside them (waiting included), payload bytes."""
        return {"calls": self.calls, "seconds": self.seconds, "bytes": self.bytes}

    def _count(self, t0: float, x: torch.Tensor) -> None:
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        self.bytes += x.numel() * x.element_size()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x``."""
        if self.world_size == 1:
            return x
        t0 = time.perf_counter()
        if self.fast is not None:
            self.fast.all_reduce(x)
        else:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.compute)
        self._count(t0, x)
        return x

    def _all_gather(self, local: torch.Tensor) -> torch.Tensor:
        """[world_size, *local.shape]"""
        if self.fast is not None:
            return self.fast.all_gather(local)
        import torch.distributed as dist

        # torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single
        gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        out = torch.empty((self.world_size * local.shape[0], *local.shape[1:]), dtype=local.dtype, device=local.device)
        gather_single(out, local, group=self.compute)
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
            t0 = time.perf_counter()
            out = self._all_gather(local.contiguous())
            self._count(t0, local)
            return torch.cat([out[r, ..., : parts[r]] for r in range(self.world_size)], dim=-1)

        return gather

    # ------------------------------------------------------------------ commands and start-up
    def broadcast(self, x: torch.Tensor, src: int = 0, idle: bool = False) -> torch.Tensor:
        """Rank ``src``'s ``x`` on every rank. ``idle``: a worker waiting for its next command
        waits without a time limit; everything else is bounded by the timeout."""
        if self.world_size == 1:
            return x
        t0 = time.perf_counter()
        if self.fast is not None:
            self.fast.broadcast(x, src=src, timeout_s=None if idle else self.timeout_s)
        else:
            import torch.distributed as dist

            work = dist.broadcast(x, src=src, group=self.control, async_op=True)
            if idle:
                work.wait()
            elif not work.wait(timeout=datetime.timedelta(seconds=self.timeout_s)):
                raise RankFailure(f"broadcast timed out after {self.timeout_s:g} s")
        if not idle:
            self._count(t0, x)
        return x

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s picklable ``obj`` on every rank (start-up only: slow)."""
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.control)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order (start-up only: slow)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def send_bytes(self, data: bytes | memoryview, dst: int) -> None:
        """Bulk data to rank ``dst`` (start-up only: shipping parts), on the control group."""
        import torch.distributed as dist

        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst, group=self.control)

    def recv_bytes(self, size: int, src: int) -> bytes:
        """``size`` bytes sent by rank ``src`` with ``send_bytes``."""
        import torch.distributed as dist

        buf = torch.empty(size, dtype=torch.uint8)
        dist.recv(buf, src, group=self.control)
        return buf.numpy().tobytes()

    # ------------------------------------------------------------------ failure and end
    def poison(self) -> None:
        """Make every pending wait of our collectives fail now (a rank died)."""
        if self.fast is not None:
            self.fast.poison()

    def close(self) -> None:
        if self.fast is not None:
            self.fast.close()
            self.fast = None
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:  # a broken group cannot always be torn down cleanly
                    pass
