"""A request's sequence and how its tokens are picked (``SamplingParams``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch


@dataclasses.dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 = greedy (the default)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int = 0
    ignore_eos: bool = False  # benchmarks: always make max_new_tokens tokens

    def validate(self) -> "SamplingParams":
        def number(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if v < lo or v > hi or (lo_open and v == lo):
                low = f"({lo}" if lo_open else f"[{lo}"
                raise ValueError(f"{name}={v!r} is out of range; allowed: {low}, {hi}]")

        def integer(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")

        integer("max_new_tokens", 1, 1 << 30)
        number("temperature", 0.0, 100.0)
        integer("top_k", 0, 1 << 30)
        number("top_p", 0.0, 1.0, lo_open=True)
        number("repetition_penalty", 0.0, 100.0, lo_open=True)
        number("frequency_penalty", -2.0, 2.0)
        number("presence_penalty", -2.0, 2.0)
        integer("logprobs", 0, 20)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclasses.dataclass
class Sequence:
    """One request's state while it runs in a slot."""

    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = dataclasses.field(default_factory=list)  # prompt + generated
    slot: int = -1
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None  # why, when finish_reason is "error"
    generator: torch.Generator | None = None
    stop_check: Callable[[list[int]], bool] | None = None
    token_logprobs: list[dict] = dataclasses.field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None
