"""Entry point of ranks 1..N-1 when tpllama launches them itself (``python -m tpllama.worker``).

MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE come from the launcher (``dist.Workers``)."""

from __future__ import annotations

import argparse
import os
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    from .dist import LocalStore, init_ranks, set_parent_death_signal
    from .engine import _agree_loaded, _load_rank
    from .loading import parse_dtype
    from .runner import follow

    set_parent_death_signal()
    p = argparse.ArgumentParser(prog="tpllama.worker")
    p.add_argument("--parts", required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    rank = int(os.environ["RANK"])
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from pathlib import Path

    store = LocalStore(a.world_size, a.timeout, port=int(os.environ["MASTER_PORT"]))
    ctx = init_ranks(rank, a.world_size, a.device, a.timeout, local_store=store, loopback_only=True)
    model, _share, _args, err = _load_rank(Path(a.parts), rank, a.world_size, parse_dtype(a.dtype), ctx)
    try:
        _agree_loaded(ctx, err, None)
    except SystemExit as e:
        if err:
            print(f"tpllama: {err}", file=sys.stderr)
        return int(e.code or 1)
    try:
        follow(model, ctx)
    except Exception as e:  # rank 0 died or a collective timed out
        print(f"tpllama: rank {rank} stopping: {type(e).__name__}: {str(e).splitlines()[0][:300]}", file=sys.stderr)
        os._exit(1)
    ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
