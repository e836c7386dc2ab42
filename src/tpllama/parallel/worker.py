"""Entry point of ranks 1..N-1 that tpllama starts itself (``python -m tpllama.parallel.worker``).

torch's env:// variables (RANK, WORLD_SIZE) say which rank this is. The worker imports torch and
the engine first, then waits for rank 0 to write its store's port on stdin (``parallel.early``:
rank 0 may still be importing torch itself, or cutting the model); stdin closing first means rank
0 is gone, and the worker leaves. It reads the engine's config from the store, and from there on
runs exactly what every other rank runs (``engine.load.run_rank``)."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys


def main() -> int:
    from .. import env
    from .launch import Workers, join, set_parent_death_signal, threads_per_rank

    # Ctrl-C in a terminal reaches every process of the foreground group: rank 0 decides what it
    # means and ends this rank (it tells it to stop, or this rank dies with it), without a
    # KeyboardInterrupt traceback from here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_parent_death_signal()
    import torch

    from ..engine.load import run_rank  # the engine's imports, before waiting

    port = sys.stdin.readline().strip()
    if not port.isdigit():  # stdin closed: rank 0 left before launching the ranks
        return 0
    me = dataclasses.replace(env.torchrun_env(), master_port=int(port))
    store, cfg = Workers.read_config(me.world_size, me.master_port)
    torch.set_num_threads(threads_per_rank(cfg))
    torch.manual_seed(0)  # the same seed in every process
    comm = join(me.rank, cfg, me.local_rank, store=store)

    try:
        run_rank(cfg, comm)
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # rank 0 died or a collective timed out
        print(f"tpllama: rank {me.rank} stopping: {type(e).__name__}: {str(e).splitlines()[0][:300]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # not tearing the interpreter down: freeing a loaded part's memory takes about a second
