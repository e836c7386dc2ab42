"""What a host can do, and the shares to cut with (``--shares auto``, ``tpllama probe``).

A decode step is bound by the bytes it reads (memory-read bandwidth), a prefill step by
arithmetic (float32 matrix multiply). Each rank measures both with its own threads; under
torchrun every rank of every host measures at once (ranks of one host share its memory, as they
will when they run), and the shares are the ranks' read bandwidths relative to the slowest: they
set how fast each rank streams its weights.
"""

from __future__ import annotations

import time

import torch

GB, GiB = 1e9, 1 << 30


def stream_probe(threads: int, nbytes: int = GiB, repeats: int = 3, device: str | torch.device = "cpu") -> dict:
    """Memory-read bandwidth: ``torch.sum`` over ``nbytes`` of float32, best of ``repeats``."""
    device = torch.device(device)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)  # pages touched here
        runs = []
        for _ in range(repeats):
            _sync_dev(device)
            t0 = time.perf_counter()
            s = x.sum()
            _sync_dev(device)
            dt = time.perf_counter() - t0
            runs.append(x.numel() * 4 / dt / GB)
            del s
        del x
    finally:
        torch.set_num_threads(old)
    return {"method": f"torch.sum over {nbytes / GiB:g} GiB float32, best of {repeats}", "bytes": int(nbytes),
            "threads": threads, "device": str(device), "gbps": max(runs), "runs_gbps": runs}


def _sync_dev(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PROBE_BYTES = 256 << 20  # the read probe's buffer
GEMM = 1024  # the compute probe multiplies two GEMM x GEMM float32 matrices


def best_time(fn, repeats: int = 3) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn()``, after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(threads: int, probe_bytes: int = PROBE_BYTES) -> dict:
    """This process's memory-read bandwidth (GB/s) and float32 matmul speed (GFLOP/s)."""
    read = stream_probe(threads, probe_bytes, repeats=3)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(GEMM, GEMM), torch.randn(GEMM, GEMM)
        best = best_time(lambda: a @ b)
    finally:
        torch.set_num_threads(old)
    return {"read_gbps": read["gbps"], "gflops": 2 * GEMM**3 / best / 1e9, "threads": threads}


def shares_from(figures: list[dict]) -> tuple[float, ...]:
    """The shares to cut with: each rank's read bandwidth, relative to the slowest (rounded)."""
    slowest = min(f["read_gbps"] for f in figures)
    return tuple(round(f["read_gbps"] / slowest, 2) for f in figures)


def measured_shares(comm, threads: int) -> tuple[float, ...]:
    """Every rank measures itself at once; every rank gets the shares (and rank 0 prints them)."""
    import socket

    figures = comm.all_gather_object(dict(measure(threads), host=socket.gethostname()))
    shares = shares_from(figures)
    if comm.rank == 0:
        print(table(figures, shares), flush=True)
    return shares


def table(figures: list[dict], shares: tuple[float, ...]) -> str:
    rows = ["| rank | host | threads | memory read | float32 matmul | share |", "|--:|:--|--:|--:|--:|--:|"]
    for r, (f, s) in enumerate(zip(figures, shares)):
        rows.append(f"| {r} | {f.get('host', '')} | {f['threads']} | {f['read_gbps']:.1f} GB/s | "
                    f"{f['gflops']:.0f} GFLOP/s | {s:g} |")
    rows.append(f"\n--shares {','.join(f'{s:g}' for s in shares)}")
    return "\n".join(rows)
