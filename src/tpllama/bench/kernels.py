"""Micro-benchmarks of the quantized kernels.

- ``python -m tpllama.bench.kernels OUT IN [int8|int4] [threads]``: the decode kernel (one
  activation row) against a memory bandwidth probe run in the same process;
- ``python -m tpllama.bench.kernels --gemm int8|int4 OUTxINxM ...``: prefill, the int8 GEMM (many
  activation rows, integer dot products) against dequantize + torch's float32 matmul, back to back
  on the same weight and input (best of 3 each);
- ``python -m tpllama.bench.kernels --attention CONTEXT [KV_HEADS [GROUP [HEAD_DIM]]]``: one decode
  step's attention (``decode_attention`` over 30 layers' float16 KV caches, SmolLM2's shape by
  default), with the caches read from memory as in a real step and with one layer's cache
  repeated (in cache), on 1 and 2 threads, against a bandwidth probe.
"""

from __future__ import annotations

import time

import torch

from .. import kernels
from ..parallel.probe import best_time, stream_probe


def bench_matvec(out: int, in_: int, scheme: str = "int8", threads: int | None = None, m: int = 1,
                 min_time: float = 0.5, probe_bytes: int = 1 << 30) -> dict:
    """Time the decode kernel (M=m rows of activations) on a random [out, in_] weight.

    Several copies of the weight are cycled so that, as in a real model, every call streams
    its weight from DRAM rather than from cache. Returns GB/s of stored weight bytes
    (quants + scales [+ mins]), a bandwidth probe (timed ``sum()`` of ``probe_bytes``) run
    right before and after in the same process, and the ratio.
    """
    from ..model import quant

    threads = int(threads or torch.get_num_threads())
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lin = quant.quantize_weight(torch.randn(out, in_) * 0.02, scheme)
        wbytes = sum(t.numel() * t.element_size() for t in lin.stored_tensors().values())
        copies = max(1, min(64, -(-(256 << 20) // wbytes)))  # >= 256 MiB in rotation
        mods = [lin] + [quant.QuantLinear.from_state(
            {k: v.clone() for k, v in lin.stored_tensors().items()}) for _ in range(copies - 1)]
        x = torch.randn(m, in_)
        kernel = kernels.get() is not None
        with torch.inference_mode():
            for mod in mods:
                mod(x)
            probe1 = stream_probe(threads, probe_bytes)["gbps"]
            n = 0
            t0 = time.perf_counter()
            while True:
                for mod in mods:
                    mod(x)
                n += len(mods)
                dt = time.perf_counter() - t0
                if dt >= min_time:
                    break
            probe2 = stream_probe(threads, probe_bytes)["gbps"]
        gbs = wbytes * n / dt / 1e9
        probe = max(probe1, probe2)
        return {
            "out": out, "in": in_, "scheme": scheme, "threads": threads, "m": m, "kernel": kernel,
            "weight_bytes": wbytes, "us_per_call": dt / n * 1e6, "gbps": gbs,
            "probe_gbps": probe, "probe_before_gbps": probe1, "probe_after_gbps": probe2,
            "pct_of_probe": 100.0 * gbs / probe,
        }
    finally:
        torch.set_num_threads(old_threads)


def bench_gemm(out: int, in_: int, m: int, scheme: str = "int8", reps: int = 3) -> dict:
    """Time ``m`` activation rows through a random [out, in_] quantized weight both ways."""
    from ..model import quant

    k = kernels.get()
    if k is None:
        raise SystemExit("the CPU kernels are not available on this machine")
    lin = quant.quantize_weight(torch.randn(out, in_) * 0.02, scheme)
    x = torch.randn(m, in_)

    with torch.inference_mode():
        t_int = best_time(lambda: lin._kernel_matvec(k, x), reps)
        t_float = best_time(lambda: lin._prefill(k, x), reps)
        y_int, y_float = lin._kernel_matvec(k, x), lin._prefill(k, x)
    macs = out * in_ * m
    return {"out": out, "in": in_, "m": m, "scheme": scheme, "threads": torch.get_num_threads(),
            "isa": kernels.isa(), "int8_gemm_ms": t_int * 1e3, "dequant_sgemm_ms": t_float * 1e3,
            "int8_gemm_gmacs": macs / t_int / 1e9, "dequant_sgemm_gmacs": macs / t_float / 1e9,
            "speedup": t_float / t_int, "rel_diff": float((y_int - y_float).norm() / y_float.norm())}


def bench_attention(context: int, kv_heads: int = 3, group: int = 3, head_dim: int = 64, layers: int = 30,
                    threads: int = 1, reps: int = 7, probe_bytes: int = 1 << 30) -> dict:
    """Time ``layers`` calls of the decode-attention kernel, one query row at ``context`` keys.

    ``cold``: every call reads its own layer's float16 K/V cache (``layers`` x 2 x kv_heads x
    context x head_dim x 2 bytes, more than the caches hold), as a decode step does; ``hot``: one
    layer's cache every call (it stays in cache: the arithmetic alone). Best and median of
    ``reps`` (ms per step), the cold GB/s and a bandwidth probe on the same threads.
    """
    k = kernels.get()
    if k is None:
        raise SystemExit("the CPU kernels are not available on this machine")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        shape = (1, kv_heads, context + 64, head_dim)
        caches = [(torch.randn(shape, generator=g).half(), torch.randn(shape, generator=g).half()) for _ in range(layers)]
        q = torch.randn(1, kv_heads * group, head_dim, generator=g)
        lengths = torch.tensor([context])
        scale = head_dim ** -0.5

        def step(cold: bool) -> None:
            for i in range(layers):
                kc, vc = caches[i if cold else 0]
                k.decode_attention(q, kc, vc, lengths, scale)

        out = {"context": context, "kv_heads": kv_heads, "group": group, "head_dim": head_dim, "layers": layers,
               "threads": threads, "isa": kernels.isa()}
        for name, cold in (("cold", True), ("hot", False)):
            step(cold)
            runs = []
            for _ in range(reps):
                t0 = time.perf_counter()
                step(cold)
                runs.append(time.perf_counter() - t0)
            runs.sort()
            out[f"{name}_ms_best"], out[f"{name}_ms_median"] = runs[0] * 1e3, runs[len(runs) // 2] * 1e3
        nbytes = layers * 2 * kv_heads * context * head_dim * 2
        out["bytes_per_step"] = nbytes
        out["cold_gbps"] = nbytes / out["cold_ms_best"] / 1e6
        out["probe_gbps"] = stream_probe(threads, probe_bytes)["gbps"]
        return out
    finally:
        torch.set_num_threads(old_threads)


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:2] == ["--gemm"]:
        print(f"{'scheme':6} {'out x in':>12} {'M':>5} {'int8 GEMM':>19} {'dequant + sgemm':>19} {'speedup':>8}")
        for shape in sys.argv[3:]:
            o, i, mm = (int(v) for v in shape.split("x"))
            r = bench_gemm(o, i, mm, sys.argv[2])
            print(f"{r['scheme']:6} {o:>5} x {i:<5} {mm:>5} {r['int8_gemm_ms']:7.1f} ms {r['int8_gemm_gmacs']:5.1f} GMAC/s "
                  f"{r['dequant_sgemm_ms']:7.1f} ms {r['dequant_sgemm_gmacs']:5.1f} GMAC/s {r['speedup']:7.2f}x", flush=True)
        sys.exit(0)
    if sys.argv[1:2] == ["--attention"]:
        shape = [int(v) for v in sys.argv[2:]]
        for threads in (1, 2):
            r = bench_attention(*shape, threads=threads)
            print(f"context {r['context']}, {r['kv_heads']} KV heads x {r['group']} query heads, head_dim {r['head_dim']}, "
                  f"{r['layers']} layers, {threads} thread(s), {r['isa']}: from memory {r['cold_ms_best']:.2f} ms per step "
                  f"(median {r['cold_ms_median']:.2f}; {r['bytes_per_step'] / 1e6:.1f} MB, {r['cold_gbps']:.1f} GB/s of a "
                  f"{r['probe_gbps']:.1f} GB/s probe), in cache {r['hot_ms_best']:.2f} (median {r['hot_ms_median']:.2f})",
                  flush=True)
        sys.exit(0)
    out, in_ = int(sys.argv[1]), int(sys.argv[2])
    scheme = sys.argv[3] if len(sys.argv) > 3 else "int8"
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else None
    print(json.dumps(bench_matvec(out, in_, scheme, threads), indent=1))
