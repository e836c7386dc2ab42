"""``tpllama bench``: one warm-up run (not counted), then ``--repeat`` runs (median reported) of
``--batch`` prompts of ``--input-len`` tokens each generating exactly ``--output-len`` tokens
(EOS ignored). Reported per engine: decode speed (prefill excluded), prefill time and speed, time
to first token, per-step decode latency p50/p90/max, peak resident memory of every rank, bytes a
decode step must read (weights of every rank's share + one embedding row + the KV cache at the
mean context length), the bandwidth that implies and its share of this machine's memory-read
bandwidth (a streaming-read probe run right after the measurement, with the same total thread
count). ``--compare hf`` adds transformers' LlamaForCausalLM on the same weights (child process,
same dtype and total thread count); ``--synthetic NAME`` benchmarks a published LLaMA config with
random weights (see ``synthetic``). Timing lives in ``timing``, the rest in ``roofline``, ``hf``
and ``synthetic``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import statistics
from pathlib import Path


# ---------------------------------------------------------------------- summaries
def summarize(ms: list) -> dict:
    """Median figures over repetitions (and each repetition's own)."""
    med = statistics.median
    b, s_in = ms[0].batch, ms[0].input_len
    prefill_s = med(m.prefill_s for m in ms)
    runs = [
        {"prefill_s": m.prefill_s, "ttft_s": m.ttft_s, "decode_s": m.decode_s, "decode_tok_s": m.decode_tok_s,
         "latency_p50_s": m.latency(0.5), "latency_p90_s": m.latency(0.9), "latency_max_s": m.latency(1.0)}
        for m in ms
    ]
    return {
        "repetitions": len(ms),
        "batch": b,
        "input_len": s_in,
        "output_len": ms[0].output_len,
        "decode_steps": ms[0].decode_steps,
        "decode_tok_s": med(r["decode_tok_s"] for r in runs),
        "decode_s": med(m.decode_s for m in ms),
        "prefill_s": prefill_s,
        "prefill_tok_s": b * s_in / prefill_s,
        "ttft_s": med(m.ttft_s for m in ms),
        "latency_p50_s": med(r["latency_p50_s"] for r in runs),
        "latency_p90_s": med(r["latency_p90_s"] for r in runs),
        "latency_max_s": med(r["latency_max_s"] for r in runs),
        "runs": runs,
    }


def add_roofline(row: dict, bytes_per_step: dict, probe: dict | None, host_ranks: int | None = None) -> dict:
    """Bytes per step, achieved GB/s (bytes per step x steps per second) and % of the probe.
    ``host_ranks``: across hosts, the probe measured host 0, so the bytes of host 0's ranks count."""
    steps_per_s = row["decode_tok_s"] / row["batch"]
    counted = bytes_per_step["total_bytes"]
    if host_ranks is not None:
        counted = sum(r["weight_bytes"] + r["kv_bytes"] for r in bytes_per_step["per_rank"][:host_ranks])
        row["roofline_scope"] = f"host 0's {host_ranks} rank(s) against host 0's probe"
    achieved = counted * steps_per_s / 1e9
    row["bytes_per_step"] = bytes_per_step
    row["steps_per_s"] = steps_per_s
    row["achieved_gbps"] = achieved
    row["roofline_gbps"] = probe["gbps"] if probe else None
    row["roofline_pct"] = 100.0 * achieved / probe["gbps"] if probe else None
    row["probe"] = probe
    return row


# ---------------------------------------------------------------------- tables
def _mb(n) -> str:
    """Bytes in kB / MB / GB (decimal)."""
    if n is None:
        return "?"
    if n >= 10e9:
        return f"{n / 1e9:.1f} GB"
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.0f} MB" if n >= 100e6 else f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB"


def _gbps(x: float) -> str:
    return f"{x:.1f} GB/s" if x >= 10 else f"{x:.2f} GB/s" if x >= 0.1 else f"{x:.2g} GB/s"


def _pct(r: dict) -> str:
    p = r["roofline_pct"]
    if p is None:
        return "? (no probe)"
    return f"{p:.0f} % of {r['roofline_gbps']:.1f} GB/s" if p >= 10 else f"{p:.2g} % of {r['roofline_gbps']:.1f} GB/s"


def _ms(s) -> str:
    return f"{s * 1000:.0f} ms" if s >= 1 else f"{s * 1000:.1f} ms"


def per_rank_steps(times: list[dict]) -> list[dict]:
    """Per rank, per decode step: compute and communication time (waiting included), payload
    bytes of the collectives, and communication's share of the step."""
    out = []
    for rank, t in enumerate(times):
        d = t["decode"]
        n = max(1, d["steps"])
        out.append({"rank": rank, "decode_steps": d["steps"], "step_ms": 1e3 * d["seconds"] / n,
                    "compute_ms": 1e3 * (d["seconds"] - d["comm_seconds"]) / n, "comm_ms": 1e3 * d["comm_seconds"] / n,
                    "collectives_per_step": d["comm_calls"] / n, "bytes_per_step": d["comm_bytes"] / n,
                    "comm_share": d["comm_seconds"] / d["seconds"] if d["seconds"] else 0.0, "prefill": t["prefill"]})
    return out


def rank_table(steps: list[dict]) -> str:
    """Where each rank's decode step goes (the communication includes waiting for the slowest rank)."""
    out = ["| rank | decode step | compute | communication (waiting included) | collectives | payload per step | "
           "communication share |", "|--:|--:|--:|--:|--:|--:|--:|"]
    for r in steps:
        out.append(f"| {r['rank']} | {r['step_ms']:.2f} ms | {r['compute_ms']:.2f} ms | {r['comm_ms']:.2f} ms | "
                   f"{r['collectives_per_step']:.0f} | {_mb(r['bytes_per_step'])} | {100 * r['comm_share']:.1f} % |")
    return "\n".join(out)


def bench_tables(rows: list[dict], ratio: dict | None) -> str:
    """The seed's table (one row per engine) and a second table with the other figures."""
    out = ["| hardware | input length | output length | decode speed |", "|:--|:--:|:--:|:--:|"]
    for r in rows:
        inp = str(r["input_len"]) if r["batch"] == 1 else f"{r['batch']} x {r['input_len']}"
        out.append(f"| {r['hardware']} | {inp} | {r['output_len']} | {r['decode_tok_s']:.2f} tokens/s |")
    out += [
        "",
        "| engine | prefill time | prefill speed | time to first token | decode latency p50 / p90 / max | "
        "peak RSS per rank | read per step (weights + KV) | achieved | % of roofline |",
        "|:--|--:|--:|--:|--:|:--|--:|--:|--:|",
    ]
    for r in rows:
        mem = ", ".join(f"{m['rank']}: {_mb(m['peak_rss_bytes'])}" for m in r["memory"])
        bps = r["bytes_per_step"]
        pct = _pct(r)
        out.append(
            f"| {r['engine_label']} | {_ms(r['prefill_s'])} | {r['prefill_tok_s']:.0f} tokens/s | {_ms(r['ttft_s'])} | "
            f"{r['latency_p50_s'] * 1000:.1f} / {r['latency_p90_s'] * 1000:.1f} / {r['latency_max_s'] * 1000:.1f} ms | "
            f"{mem} | {_mb(bps['weight_bytes'])} + {_mb(bps['kv_bytes'])} | {_gbps(r['achieved_gbps'])} | {pct} |"
        )
    if ratio:
        out += ["", f"tpllama / transformers: decode speed {ratio['decode_speed']:.2f}x, prefill speed "
                    f"{ratio['prefill_speed']:.2f}x, time to first token {ratio['ttft']:.2f}x "
                    f"({rows[0]['decode_tok_s']:.2f} / {rows[1]['decode_tok_s']:.2f} tokens/s)"]
    return "\n".join(out)


# ---------------------------------------------------------------------- command line
COMPARE = ("hf",)


def add_arguments(p) -> None:
    from ..flags import add_model_args

    add_model_args(p, default_world_size=2)
    g = p.add_argument_group("benchmark")
    g.add_argument("--input-len", type=int, default=1024, help="prompt tokens per row (default 1024)")
    g.add_argument("--output-len", type=int, default=1024, help="generated tokens per row, EOS ignored (default 1024)")
    g.add_argument("--batch", type=int, default=1, help="prompts decoded together (default 1)")
    g.add_argument("--repeat", type=int, default=3, help="measured repetitions, median reported (default 3)")
    g.add_argument("--warmup", type=int, default=1, help="warm-up runs before them, not counted (default 1)")
    g.add_argument("--compare", default=None, help="also measure another engine on the same weights: hf (transformers)")
    g.add_argument("--synthetic", default=None,
                   help="a published config with random weights instead of --model: llama-7b | llama-13b | tinyllama-1.1b | smollm2-135m")
    g.add_argument("--json", default=None, help="write every figure to this JSON file")
    g.add_argument("--probe-mib", type=int, default=1024,
                   help="size of the memory-bandwidth probe in MiB (default 1024; 0 = no probe, no %% of roofline)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--startup", action="store_true",
                   help="instead: wall time and peak memory from process start to the first and last of 4 tokens "
                        "(generate at N=1 and 2, from the GGUF file and a cut) and to a healthy server, cold and warm")


def _check_flags(a) -> None:
    from .synthetic import SYNTHETIC

    for name, lo in (("input_len", 1), ("output_len", 2), ("batch", 1), ("repeat", 1), ("warmup", 0), ("probe_mib", 0)):
        v = getattr(a, name)
        if v < lo:
            extra = " (decode speed needs at least one decode step after the first token)" if name == "output_len" else ""
            raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {v}{extra}")
    if a.compare is not None and a.compare not in COMPARE:
        raise ValueError(f"--compare {a.compare!r} is not supported; allowed: {', '.join(COMPARE)}")
    if a.synthetic is not None:
        if a.synthetic not in SYNTHETIC:
            raise ValueError(f"--synthetic {a.synthetic!r} is not a known config; allowed: {', '.join(SYNTHETIC)}")
        if a.model is not None:
            raise ValueError("give either --model or --synthetic, not both")
    if a.json is not None:
        parent = Path(a.json).expanduser().resolve().parent
        if not parent.is_dir():
            raise ValueError(f"--json {a.json}: directory {parent} does not exist")
        if Path(a.json).is_dir():
            raise ValueError(f"--json {a.json} is a directory")


def _model_args(path: Path):
    """ModelArgs of a model path without loading its weights."""
    from ..config import ModelArgs
    from ..weights.checkpoint import open_checkpoint
    from ..weights.parts import is_cut_dir, read_manifest

    if is_cut_dir(path):
        return ModelArgs.from_hf_config(read_manifest(path, needed=[])["config"])
    ckpt = open_checkpoint(path)
    args = ckpt.args
    ckpt.close()
    return args


def write_json(path: str, data: dict) -> None:
    import json
    import tempfile

    target = Path(path).expanduser()
    fd, tmp = tempfile.mkstemp(dir=target.resolve().parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # as an ordinary new file, not mkstemp's 0600
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def main(a) -> int:
    import datetime
    import sys

    if a.startup:
        from . import startup

        rows = startup.measure(a.model)
        print(startup.table(rows))
        if a.json:
            write_json(a.json, {"tool": "tpllama bench --startup", "rows": rows})
        return 0

    import psutil
    import torch

    from .. import kernels
    from ..config import torch_dtype
    from ..engine.engine import CACHE_COLUMNS_STEP
    from ..engine.load import start
    from ..flags import engine_config
    from ..parallel.launch import check_device, ranks_on_this_host
    from ..parallel.plan import plan
    from ..version import __version__
    from ..weights.default_model import default_model_path
    from .roofline import (RssSampler, analytic_bytes_per_weight, check_fits, mean_decode_context,
                           model_bytes_per_weight, step_bytes, stream_probe)
    from .timing import Measurement, device_name, measure, synthetic_prompt

    _check_flags(a)
    cfg = engine_config(a, progress=not a.no_progress)
    dtype, quant, ws = cfg.torch_dtype, cfg.quant, cfg.world_size
    check_device(a.device, ws)  # before a synthetic model is written or a probe runs
    progress = cfg.progress
    probe_bytes = a.probe_mib << 20
    loadavg_start = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    # ---- what to load, and whether it fits (before anything big is allocated or written)
    if a.synthetic:
        from .synthetic import synthetic_args

        args = synthetic_args(a.synthetic)
        model_label = f"synthetic {a.synthetic} (random weights)"
    else:
        path = Path(a.model).expanduser() if a.model is not None else default_model_path(quiet=not progress)
        args = _model_args(path)
        model_label = str(path)
    shares = plan(args, ws)
    auto_bpw = None
    if quant == "auto":  # a GGUF file's own blocks are kept; nothing else has any: float
        if a.synthetic or not (path.is_file() and path.suffix == ".gguf"):
            quant = None
        else:
            from .roofline import n_params

            auto_bpw = path.stat().st_size / n_params(args)  # estimate, for the memory check only
    if a.input_len + a.output_len > args.max_seq_len:
        raise ValueError(f"--input-len {a.input_len} + --output-len {a.output_len} = {a.input_len + a.output_len} exceeds "
                         f"the model's context length {args.max_seq_len}")
    cache_len = min(args.max_seq_len, -(-(a.input_len + a.output_len) // CACHE_COLUMNS_STEP) * CACHE_COLUMNS_STEP)
    what = f"--synthetic {a.synthetic}" if a.synthetic else f"model {model_label}"
    fit = check_fits(what, args, shares, dtype, quant, a.batch, cache_len, hf=a.compare == "hf", probe_bytes=probe_bytes,
                     auto_bpw=auto_bpw)
    if a.synthetic:
        from .synthetic import write_synthetic

        path = write_synthetic(a.synthetic, ws, dtype, quant, progress=progress)

    # ---- tpllama
    rows = []
    with start(dataclasses.replace(cfg, model=str(path), quant=quant)) as engine:
        tpr = int(engine.info.get("threads_per_rank") or torch.get_num_threads())
        total_threads = tpr * engine.world_size
        local_ranks = ranks_on_this_host(engine.world_size)  # fewer than world_size across hosts
        dev = engine.runner.device
        print(f"tpllama bench: {model_label}, {engine.info['dtype']}, quant {engine.info['quant']}, "
              f"KV cache {engine.info['kv_cache']}, on {dev}"
              + (f"; CPU kernels: {kernels.isa()}" if dev.type == "cpu" else ""))
        print(f"threads: {engine.world_size} rank(s) x {tpr} thread(s) = {total_threads}"
              + (f"; transformers: 1 process x {total_threads} thread(s)" if a.compare else ""))
        for s in engine.shares:
            print(f"  {s.describe()}")
        print(f"runs: {a.warmup} warm-up + {a.repeat} measured (median), {a.batch} x {a.input_len} tokens in, "
              f"{a.output_len} out, EOS ignored", flush=True)
        prompts = [synthetic_prompt(engine, a.input_len, seed=b) for b in range(a.batch)]
        pids = {0: os.getpid()}
        if engine.workers is not None:
            pids.update(engine.workers.pids())
        bar = _bar(progress, (a.warmup + a.repeat) * a.output_len * a.batch, "tpllama")
        ms = []
        with RssSampler(pids) as sampler:
            for i in range(a.warmup + a.repeat):
                bar.set_description(f"tpllama {'warm-up' if i < a.warmup else f'{i - a.warmup + 1}/{a.repeat}'}")
                if i == a.warmup:
                    engine.runner.rank_times(reset=True)  # count the measured runs only
                m = measure(engine, a.input_len, a.output_len, a.batch, on_token=lambda: bar.update(1))
                if i >= a.warmup:
                    ms.append(m)
        steps_by_rank = per_rank_steps(engine.runner.rank_times())
        memory = sampler.report()  # before the probe allocates its buffer
        bar.close()
        probe = stream_probe(tpr * local_ranks, probe_bytes, device=dev) if probe_bytes else None
        bpw = model_bytes_per_weight(engine.runner.model)
        ctx = mean_decode_context(a.input_len, a.output_len)
        tp = summarize(ms)
        tp.update(engine="tpllama", engine_label=f"tpllama ({engine.world_size} rank(s) x {tpr} thread(s))",
                  hardware=f"{device_name(dev)}; tpllama {engine.world_size} rank(s) x {tpr} thread(s)",
                  dtype=engine.info["dtype"], quant=engine.info["quant"], world_size=engine.world_size,
                  threads_per_rank=tpr, threads_total=total_threads, memory=memory)
        kv_dtype = torch_dtype(engine.info["kv_cache"])
        tp["kv_cache"] = engine.info["kv_cache"]
        rows.append(add_roofline(tp, step_bytes(args, engine.shares, dtype, bpw, a.batch, ctx, kv_dtype), probe,
                                 host_ranks=local_ranks if local_ranks < engine.world_size else None))
        tp["per_rank_steps"] = steps_by_rank
        layout = {"world_size": engine.world_size, "threads_per_rank": tpr, "threads_total": total_threads,
                  "device": str(dev), "backend": engine.info.get("backend"), "launcher": engine.info.get("launcher"),
                  "parts": engine.info.get("parts"), "shares": [s.to_json() for s in engine.shares]}
        tokenizer = engine.tokenizer is not None
        share_lines = [s.describe() for s in engine.shares]
        if dev.type == "cuda":
            tp["gpu_peak_allocated_bytes_rank0"] = torch.cuda.max_memory_allocated(dev)

    # ---- transformers
    ratio = None
    if a.compare == "hf":
        from .hf import run_hf

        res = run_hf(path, dtype, str(dev), total_threads, prompts, a.output_len, a.warmup, a.repeat, probe_bytes,
                     progress=progress)
        hms = [Measurement(**m) for m in res["measurements"]]
        hf = summarize(hms)
        hf_bpw = analytic_bytes_per_weight(args, dtype, None)
        hf.update(engine="transformers",
                  engine_label=f"transformers {res['transformers_version']} ({res['attn_implementation']}, {res['threads']} thread(s))",
                  hardware=f"{device_name(dev)}; transformers 1 process x {res['threads']} thread(s)",
                  dtype=str(dtype).removeprefix("torch."), quant="none" if not quant else "none (dequantized weights)",
                  world_size=1, threads_per_rank=res["threads"], threads_total=res["threads"], memory=res["memory"],
                  load_s=res["load_s"], transformers_version=res["transformers_version"],
                  attn_implementation=res["attn_implementation"])
        if res.get("gpu_peak_allocated_bytes") is not None:
            hf["gpu_peak_allocated_bytes_rank0"] = res["gpu_peak_allocated_bytes"]
        rows.append(add_roofline(hf, step_bytes(args, plan(args, 1), dtype, hf_bpw, a.batch, ctx), res["probe"]))
        ratio = {
            "decode_speed": rows[0]["decode_tok_s"] / rows[1]["decode_tok_s"],
            "prefill_speed": rows[0]["prefill_tok_s"] / rows[1]["prefill_tok_s"],
            "ttft": rows[0]["ttft_s"] / rows[1]["ttft_s"],
            "meaning": "tpllama / transformers: speeds > 1 = tpllama faster; ttft < 1 = tpllama faster",
        }

    table = bench_tables(rows, ratio)
    print()
    print(table)
    if len(steps_by_rank) > 1:
        print()
        print(rank_table(steps_by_rank))
    print(f"\nthreads: tpllama {layout['world_size']} rank(s) x {layout['threads_per_rank']} thread(s) = "
          f"{layout['threads_total']}" + (f", transformers {rows[1]['threads_total']}" if ratio else "")
          + f"; {layout['device']}, backend {layout['backend']}, launcher {layout['launcher']}")
    for line in share_lines:
        print(f"  {line}")
    if probe:
        print(f"\nroofline: {probe['method']} with {probe['threads']} thread(s): {probe['gbps']:.1f} GB/s "
              f"(runs {', '.join(f'{g:.1f}' for g in probe['runs_gbps'])}); per step: weights of every rank's share, "
              f"one embedding row per prompt, KV cache at mean context {ctx:.0f}"
              + (f"; {rows[0]['roofline_scope']}" if rows[0].get("roofline_scope") else ""))
    load_end = os.getloadavg()
    if max(loadavg_start[0], load_end[0]) > total_threads + 0.5:
        print(f"note: the machine was busy (load average {loadavg_start[0]:.1f} -> {load_end[0]:.1f} on "
              f"{os.cpu_count()} cores): figures may be low", file=sys.stderr)
    vm = psutil.virtual_memory()
    data = {
        "tool": "tpllama bench",
        "version": __version__,
        "created": started,
        "config": {
            "model": model_label, "path": str(path), "synthetic": a.synthetic, "world_size": ws,
            "dtype": str(dtype).removeprefix("torch."), "quant": quant or "none", "device": str(dev),
            "input_len": a.input_len, "output_len": a.output_len, "batch": a.batch, "repeat": a.repeat,
            "warmup": a.warmup, "compare": a.compare, "prompts": "tokenized packaged questions" if tokenizer else "random token ids",
            "model_args": dataclasses.asdict(args),
        },
        "machine": {
            "hardware": device_name(dev), "cpu_count": os.cpu_count(), "memory_total_bytes": vm.total,
            "memory_available_bytes": vm.available, "loadavg_start": list(loadavg_start), "loadavg_end": list(load_end),
            "torch": torch.__version__, "platform": platform.platform(),
            "cpu_kernels": kernels.isa() if dev.type == "cpu" else None,
        },
        "layout": layout,
        "memory_check": fit,
        "rows": rows,
        "ratio": ratio,
        "table": table,
    }
    if a.json:
        write_json(a.json, data)
        print(f"\nwrote {a.json}")
    return 0


def _bar(enabled: bool, total: int, desc: str):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, disable=not enabled, leave=False)
