"""Where a decode step goes: rank 0's whole step, model forward and all-reduces, then every
rank's mean step and its time inside collectives.

    .venv/bin/python scripts/decode-step-timing.py --world-size 2 [--input-len 1024 --output-len 512 --repeat 1]

Loads the default model (quant auto, as `tpllama bench`), feeds one prompt of --input-len
random tokens, and times --output-len greedy decode steps with timers wrapped around
``runner.forward`` and the model's ``reduce``. At N > 1, time inside ``reduce`` is mostly rank 0
waiting for the slower rank; the exchange itself is a few microseconds (``python -m tpllama.bench.collectives 2``).
The per-rank lines come from the runner's own counters (``ModelRunner.rank_times``): a rank that
waits long in collectives is waiting for a slower one.
"""

import argparse
import time

import torch

import tpllama


def timed(fn, total: list[float]):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        total[0] += time.perf_counter() - t
        return out

    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    with tpllama.load(None, world_size=a.world_size, quant="auto") as engine:
        ids = torch.randint(3, 40000, (1, a.input_len), generator=torch.Generator().manual_seed(0))
        engine.generate(ids, max_new_tokens=8, ignore_eos=True)  # warm-up
        forward, reduce = [0.0], [0.0]
        engine.runner.forward = timed(engine.runner.forward, forward)
        model = engine.runner.model
        model.reduce = timed(model.reduce, reduce)
        steps = a.output_len - 1
        engine.runner.rank_times(reset=True)
        for _ in range(a.repeat):
            t = time.perf_counter()
            engine.generate(ids, max_new_tokens=1, ignore_eos=True)  # prefill alone, subtracted below
            prefill, prefill_forward, prefill_reduce = time.perf_counter() - t, forward[0], reduce[0]
            t = time.perf_counter()
            engine.generate(ids, max_new_tokens=a.output_len, ignore_eos=True)
            step = (time.perf_counter() - t - prefill) / steps
            fwd = (forward[0] - 2 * prefill_forward) / steps
            red = (reduce[0] - 2 * prefill_reduce) / steps
            forward[0] = reduce[0] = 0.0
            print(f"N={a.world_size}, context {a.input_len}-{a.input_len + a.output_len}: {step * 1e3:.2f} ms per "
                  f"step, {fwd * 1e3:.2f} in runner.forward, {red * 1e3:.2f} in the all-reduces")
        for r, report in enumerate(engine.runner.rank_times(reset=True)):
            d = report["decode"]
            n = max(1, d["steps"])
            print(f"rank {r}: {d['steps']} decode steps, {d['seconds'] / n * 1e3:.2f} ms per step, "
                  f"{d['comm_seconds'] / n * 1e3:.2f} ms of it in {d['comm_calls'] / n:.0f} collectives")


if __name__ == "__main__":
    main()
