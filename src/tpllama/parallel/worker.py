"""Entry point of ranks 1..N-1 that tpllama starts itself (``python -m tpllama.parallel.worker``).

torch's env:// variables (RANK, WORLD_SIZE, MASTER_PORT) say which rank this is and where rank 0's
store listens (``launch.Workers``); the engine's config is read from that store. From there on
the rank runs exactly what every other rank runs (``engine.load.run_rank``)."""

from __future__ import annotations

import sys


def main() -> int:
    from .. import env
    from .launch import Workers, join, set_parent_death_signal, threads_per_rank

    set_parent_death_signal()
    me = env.torchrun_env()
    store, cfg = Workers.read_config(me.world_size, me.master_port)
    import torch

    torch.set_num_threads(threads_per_rank(cfg))
    torch.manual_seed(0)  # the same seed in every process
    comm = join(me.rank, cfg, me.local_rank, store=store)
    from ..engine.load import run_rank

    try:
        run_rank(cfg, comm)
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # rank 0 died or a collective timed out
        print(f"tpllama: rank {me.rank} stopping: {type(e).__name__}: {str(e).splitlines()[0][:300]}", file=sys.stderr)
        import os

        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
