"""``tpllama probe``: every rank measures its host (``parallel.probe``); rank 0 prints the table
and the ``--shares`` to cut with. Without torchrun: this host alone."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores / ranks on this host)")
    p.add_argument("--world-size", type=int, default=None, help="under torchrun: its WORLD_SIZE (default)")
    p.add_argument("--timeout", type=float, default=60.0)


def main(a) -> int:
    """Under torchrun: every rank measures, rank 0 prints the table. Else: this host alone."""
    import torch

    from ..config import EngineConfig
    from ..env import torchrun_env
    from ..parallel.comm import Communicator
    from ..parallel.launch import join, threads_per_rank
    from ..parallel.probe import measured_shares

    tr = torchrun_env()
    world = a.world_size or (tr.world_size if tr else 1)
    cfg = EngineConfig(world_size=world, threads=a.threads, timeout_s=a.timeout).validate()
    if tr is None:
        comm = Communicator.single(torch.device("cpu"))
    else:
        comm = join(tr.rank, cfg, tr.local_rank)
    try:
        measured_shares(comm, threads_per_rank(cfg))
    finally:
        comm.close()
    return 0
