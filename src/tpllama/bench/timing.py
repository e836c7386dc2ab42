"""Timing generation: prefill, time to first token, decode speed and per-token latency, and the
seed's table. ``measure`` is the one timing routine: ``tpllama run`` prints the seed's table from
it and ``tpllama bench`` repeats it and adds the comparisons and the memory roofline."""

from __future__ import annotations

import dataclasses
import os
import platform
import time

import torch


@dataclasses.dataclass
class Measurement:
    batch: int
    input_len: int
    output_len: int
    prefill_s: float  # wall time until every row has its first token
    ttft_s: float  # time to the first row's first token
    decode_s: float  # wall time of the decode steps (prefill excluded)
    decode_steps: int
    step_latencies_s: list[float]

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.input_len / self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        """Generated tokens per second over the decode steps, all rows together."""
        return self.batch * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")

    def latency(self, q: float) -> float:
        lat = sorted(self.step_latencies_s)
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")


def synthetic_prompt(engine, length: int, seed: int = 0) -> list[int]:
    """``length`` token ids: the packaged questions' text repeated (random ids without a tokenizer)."""
    if engine.tokenizer is not None:
        from importlib import resources

        text = resources.files("tpllama").joinpath("data/questions.txt").read_text()
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        return (ids * (length // max(1, len(ids)) + 1))[:length]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, engine.args.vocab_size, (length,), generator=g).tolist()


def _sync(engine) -> None:
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize(engine.runner.device)


def measure(engine, input_len: int, output_len: int, batch: int = 1, on_token=None) -> Measurement:
    """Generate exactly ``output_len`` tokens (EOS ignored) for ``batch`` prompts of ``input_len``."""
    prompts = [synthetic_prompt(engine, input_len, seed=b) for b in range(batch)]
    first: dict[int, float] = {}
    step_times: list[float] = []
    counted = 0
    _sync(engine)
    t0 = time.perf_counter()
    for row, _tok in engine.iterate(prompts, max_new_tokens=output_len, ignore_eos=True):
        now = time.perf_counter()
        if row not in first:
            first[row] = now
        else:
            counted += 1
            if counted % batch == 0:
                step_times.append(now)
        if on_token is not None:
            on_token()
    _sync(engine)
    t_end = time.perf_counter()
    prefill_end = max(first.values())
    lat = [b - a for a, b in zip([prefill_end] + step_times[:-1], step_times)]
    return Measurement(
        batch=batch,
        input_len=input_len,
        output_len=output_len,
        prefill_s=prefill_end - t0,
        ttft_s=min(first.values()) - t0,
        decode_s=t_end - prefill_end,
        decode_steps=output_len - 1,
        step_latencies_s=lat,
    )


def device_name(dev: torch.device) -> str:
    """The accelerator's name, or the CPU model and core count."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def hardware_name(engine) -> str:
    return f"{device_name(engine.runner.device)}; {engine.world_size} rank(s) x {engine.info.get('threads_per_rank')} thread(s)"


def seed_table(hardware: str, m: Measurement) -> str:
    """The seed's performance table (markdown), plus prefill figures."""
    rows = [
        "| hardware | input length | output length | decode speed | prefill time | prefill speed |",
        "|:--|:--:|:--:|:--:|:--:|:--:|",
        f"| {hardware} | {m.batch} x {m.input_len} | {m.output_len} | {m.decode_tok_s:.2f} tokens/s | "
        f"{m.prefill_s * 1000:.0f} ms | {m.prefill_tok_s:.0f} tokens/s |",
    ]
    return "\n".join(rows)
