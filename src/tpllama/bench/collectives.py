"""Micro-benchmarks of the collectives.

``python -m tpllama.bench.collectives [world_size] [iters]``: the ranks of one host, shared memory
against gloo, per operation, in spawned processes of one thread each.

Under torchrun (``python -m tpllama.bench.collectives --ranks [auto|gloo]``, e.g. on namespaced
hosts with ``python -m tpllama.bench.hosts --hosts 2 --module tpllama.bench.collectives -- --ranks
auto``): the ranks join exactly as the engine's do (``parallel.launch.join``: TCP between hosts,
shared memory + TCP when hosts run several ranks; ``gloo``: torch.distributed's own) and time one
all-reduce of 2-64 KB and the step broadcast; rank 0 prints the table.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch

from .. import kernels
from ..parallel.shm import ShmCollectives


def _bench_rank(rank: int, world: int, port: int, name: str, iters: int, big_numel: int, q) -> None:
    import statistics

    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world, False, datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    s = ShmCollectives(name, rank, world)
    dist.barrier()
    s.unlink()

    def timed(fn, n):
        for _ in range(min(200, n)):
            fn()
        dist.barrier()
        ts = []
        pc = time.perf_counter_ns
        for _ in range(n):
            t0 = pc()
            fn()
            ts.append(pc() - t0)
        ts.sort()
        return {"median_us": statistics.median(ts) / 1e3, "p90_us": ts[int(0.9 * len(ts))] / 1e3,
                "mean_us": sum(ts) / len(ts) / 1e3}

    x = torch.randn(1, 1, 576)
    h = torch.arange(64, dtype=torch.int64)
    big = torch.randn(big_numel)
    res = {"load_avg": os.getloadavg()}
    n_big = max(20, iters // 50)
    res["shm all_reduce [1,1,576] f32"] = timed(lambda: s.all_reduce(x), iters)
    res["gloo all_reduce [1,1,576] f32"] = timed(lambda: dist.all_reduce(x), iters)
    res["shm broadcast 64 int64"] = timed(lambda: s.broadcast(h, 0), iters)
    res["gloo broadcast 64 int64"] = timed(lambda: dist.broadcast(h, 0), iters)
    res[f"shm all_reduce {big.numel() * 4 / 1e6:.1f} MB f32"] = timed(lambda: s.all_reduce(big), n_big)
    res[f"gloo all_reduce {big.numel() * 4 / 1e6:.1f} MB f32"] = timed(lambda: dist.all_reduce(big), n_big)
    res["load_avg_after"] = os.getloadavg()
    s.close()
    dist.destroy_process_group()
    q.put((rank, res))


def bench(world_size: int = 2, iters: int = 10000, big_numel: int = 600_000) -> dict:
    """Per-op latency of shm vs gloo collectives in ``world_size`` spawned processes (1 thread
    each, same run): all_reduce of [1,1,576] float32, broadcast of 64 int64 from rank 0, and an
    all_reduce of ``big_numel`` float32. Returns {rank: {op: {median_us, p90_us, mean_us}}}."""
    import multiprocessing as mp

    from ..parallel.launch import LocalStore

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    host = LocalStore(world_size, 60.0)  # rank 0's store, held here; every rank connects to it
    name = ShmCollectives.make_name()
    kernels.collectives()  # build once here, not in every child
    procs = [ctx.Process(target=_bench_rank, args=(r, world_size, host.port, name, iters, big_numel, q))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out = dict(q.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    return out


SIZES_KB = (2, 8, 16, 64)


def ranks_main(kind: str = "auto", iters: int = 2000) -> int:
    """Every rank under torchrun: the collectives of ``kind`` ("auto" or "gloo"), joined as the engine joins."""
    import statistics

    from ..config import EngineConfig
    from ..env import torchrun_env
    from ..parallel.launch import join

    torch.set_num_threads(1)
    me = torchrun_env()
    comm = join(me.rank, EngineConfig(world_size=me.world_size, collectives=kind).validate(), me.local_rank)

    def timed(fn):
        for _ in range(min(200, iters)):
            fn()
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter_ns()
            fn()
            ts.append(time.perf_counter_ns() - t0)
        ts.sort()
        return statistics.median(ts) / 1e3, ts[int(0.9 * len(ts))] / 1e3

    rows = {}
    for kb in SIZES_KB:
        x = torch.randn(kb * 256)
        rows[f"all_reduce {kb} KB"] = timed(lambda: comm.all_reduce(x))
    message = torch.zeros(64, dtype=torch.int64)
    rows["broadcast 512 B (a decode step's command)"] = timed(lambda: comm.broadcast(message))
    if me.rank == 0:
        print(f"{me.world_size} ranks, {me.local_world_size} per host, one thread each, through {comm.backend}; "
              f"median / p90 per operation over {iters}")
        print("| path | operation | median | p90 |")
        print("|:--|:--|--:|--:|")
        for op, (med, p90) in rows.items():
            print(f"| {comm.backend} | {op} | {med:.0f} us | {p90:.0f} us |")
    comm.close()
    return 0


if __name__ == "__main__":
    import json

    if sys.argv[1:2] == ["--ranks"]:
        sys.exit(ranks_main(sys.argv[2] if len(sys.argv) > 2 else "auto", *[int(a) for a in sys.argv[3:]]))
    args = [int(a) for a in sys.argv[1:]]
    print(json.dumps(bench(*args), indent=1))
