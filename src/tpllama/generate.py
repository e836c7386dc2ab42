"""Prefill, decode steps and sampling over a KV cache of slots.

``Decoder`` owns the slots: a sequence joins (its prompt is prefilled into a free slot and its
first token sampled), then every ``step()`` decodes one token for all running sequences
together, and a finished sequence leaves, freeing its slot. Batched ``generate`` and the
server's continuous batching are both this one loop.

The model is reached only through ``forward(tokens [B, T], positions [B, T], rows) -> logits
[B, 1, vocab]``, so the same loop drives one rank or N ranks.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Sequence as Seq

import torch

Forward = Callable[[torch.Tensor, torch.Tensor, "slice | torch.Tensor"], torch.Tensor]


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
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    generator: torch.Generator | None = None
    stop_check: Callable[[list[int]], bool] | None = None
    token_logprobs: list[dict] = dataclasses.field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def sample(logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
    """logits float32 [B, vocab] -> next token ids int64 [B], one row per sequence."""
    if all(s.params.greedy and _plain(s.params) for s in seqs):
        return logits.argmax(dim=-1)
    out = torch.empty(len(seqs), dtype=torch.int64)
    for i, s in enumerate(seqs):
        row = penalize(logits[i], s.tokens, s.params)
        p = s.params
        if p.greedy:
            out[i] = row.argmax()
            continue
        row = row / p.temperature
        if p.top_k and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix reaching top_p
            row = row.index_put((order[drop],), torch.tensor(float("-inf")))
        probs = row.softmax(-1)
        out[i] = torch.multinomial(probs, 1, generator=s.generator)[0]
    return out


def _plain(p: SamplingParams) -> bool:
    return p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0


def penalize(row: torch.Tensor, history: list[int], p: SamplingParams) -> torch.Tensor:
    """Repetition (transformers' rule) and OpenAI frequency/presence penalties; row [vocab]."""
    if _plain(p) or not history:
        return row
    row = row.clone()
    ids, counts = torch.tensor(history, dtype=torch.int64).unique(return_counts=True)
    if p.repetition_penalty != 1.0:
        picked = row[ids]
        row[ids] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if p.frequency_penalty or p.presence_penalty:
        row[ids] -= p.frequency_penalty * counts.float() + p.presence_penalty
    return row


class SlotsFull(RuntimeError):
    """Every KV-cache slot is busy."""


class Decoder:
    """Runs sequences in KV-cache slots; see the module docstring."""

    def __init__(self, forward: Forward, n_slots: int, eos_ids: Seq[int], pad_id: int):
        self.forward = forward
        self.n_slots = n_slots
        self.eos_ids = frozenset(eos_ids)
        self.pad_id = pad_id
        self.running: list[Sequence] = []

    def free_slots(self) -> int:
        return self.n_slots - len(self.running)

    def add(self, seq: Sequence) -> int:
        """Prefill ``seq.prompt`` into a free slot and sample its first token (returned)."""
        used = {s.slot for s in self.running}
        free = [i for i in range(self.n_slots) if i not in used]
        if not free:
            raise SlotsFull(f"all {self.n_slots} slots are busy")
        seq.slot = free[0]
        seq.tokens = list(seq.prompt)
        if seq.params.seed is not None or not seq.params.greedy:
            seed = seq.params.seed if seq.params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            seq.generator = torch.Generator().manual_seed(seed)
        n = len(seq.prompt)
        tokens = torch.tensor([seq.prompt], dtype=torch.int64)
        positions = torch.arange(n, dtype=torch.int64)[None, :]
        logits = self.forward(tokens, positions, slice(seq.slot, seq.slot + 1))
        self.running.append(seq)
        return self._accept(logits[:, -1, :], [seq])[0]

    def step(self) -> list[tuple[Sequence, int]]:
        """One decode step for every running sequence; returns (sequence, new token) pairs.
        Finished sequences leave the running set (their slots are free again)."""
        seqs = sorted(self.running, key=lambda s: s.slot)
        if not seqs:
            return []
        tokens = torch.tensor([[s.tokens[-1]] for s in seqs], dtype=torch.int64)
        positions = torch.tensor([[len(s.tokens) - 1] for s in seqs], dtype=torch.int64)
        slots = [s.slot for s in seqs]
        if slots == list(range(slots[0], slots[0] + len(slots))):
            rows: slice | torch.Tensor = slice(slots[0], slots[0] + len(slots))
        else:
            rows = torch.tensor(slots, dtype=torch.int64)
        logits = self.forward(tokens, positions, rows)
        new = self._accept(logits[:, -1, :], seqs)
        return list(zip(seqs, new))

    def _accept(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        next_ids = sample(logits, seqs).tolist()
        want_lp = max(s.params.logprobs for s in seqs)
        logp = logits.log_softmax(-1) if want_lp else None
        for i, (s, tok) in enumerate(zip(seqs, next_ids)):
            s.tokens.append(tok)
            if logp is not None and s.params.logprobs:
                top = torch.topk(logp[i], s.params.logprobs)
                s.token_logprobs.append(
                    {"token": tok, "logprob": float(logp[i, tok]), "top": list(zip(top.indices.tolist(), top.values.tolist()))}
                )
            if tok in self.eos_ids and not s.params.ignore_eos:
                s.finish_reason = "stop"
            elif s.stop_check is not None and s.stop_check(s.generated):
                s.finish_reason = "stop"
            elif len(s.generated) >= s.params.max_new_tokens:
                s.finish_reason = "length"
        self.running = [s for s in self.running if not s.done]
        return next_ids

    def abort(self, seq: Sequence) -> None:
        """Stop ``seq`` now and free its slot."""
        seq.finish_reason = seq.finish_reason or "abort"
        self.running = [s for s in self.running if s is not seq]


def generate_batch(decoder: Decoder, seqs: list[Sequence]):
    """Run ``seqs`` together to completion; yields (sequence, token) as tokens are made."""
    for s in seqs:
        tok = decoder.add(s)
        yield s, tok
    while decoder.running:
        yield from decoder.step()
