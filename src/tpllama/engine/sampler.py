"""Picking the next token of each row: greedy, temperature, top-k, top-p, penalties."""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from .sequence import SamplingParams, Sequence


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
