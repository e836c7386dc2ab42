"""Every rank's decode step: wall time, and of it the time inside collectives (waiting for the
other ranks included), for one prompt of random tokens.

    .venv/bin/python scripts/rank-step-times.py --world-size 2 --input-len 1024 --output-len 512

Loads the default model (quant auto, as `tpllama bench`), runs a short warm-up, then one greedy
generation of --output-len tokens; prints each rank's mean decode step from the runner's own
per-rank counters (``ModelRunner.rank_times``). A rank that waits long in collectives is
waiting for a slower one.
"""

import argparse
import time

import torch

import tpllama


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=512)
    a = p.parse_args()
    with tpllama.load(None, world_size=a.world_size, quant="auto") as engine:
        ids = torch.randint(3, 40000, (1, a.input_len), generator=torch.Generator().manual_seed(0))
        engine.generate(ids, max_new_tokens=8, ignore_eos=True)  # warm-up
        engine.runner.rank_times(reset=True)
        t = time.perf_counter()
        engine.generate(ids, max_new_tokens=a.output_len, ignore_eos=True)
        wall = time.perf_counter() - t
        for r, report in enumerate(engine.runner.rank_times(reset=True)):
            d = report["decode"]
            n = max(1, d["steps"])
            print(f"rank {r}: context {a.input_len}-{a.input_len + a.output_len}, {d['steps']} decode steps, "
                  f"{d['seconds'] / n * 1e3:.2f} ms per step, {d['comm_seconds'] / n * 1e3:.2f} ms of it in "
                  f"{d['comm_calls'] / n:.0f} collectives; prefill {report['prefill']['seconds']:.2f} s")
        print(f"whole generation {wall:.2f} s")


if __name__ == "__main__":
    main()
