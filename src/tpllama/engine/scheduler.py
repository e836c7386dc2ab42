"""Which sequences run: a FIFO of waiting sequences and the running ones in KV-cache slots.

The engine asks, once per step, which waiting sequences start now (``admit``: a free slot and
room in the cache's columns, in arrival order), prefills them in groups of equal prompt length
(``prefill_groups``: several prompts in one forward where the shapes allow it), then decodes
every running sequence together (``decoding``), and drops those that finished (``retire``).
"""

from __future__ import annotations

import collections

from .sequence import Sequence


def tokens_needed(seq: Sequence) -> int:
    """KV-cache columns ``seq`` can fill: its prompt and every token it may generate."""
    return len(seq.prompt) + seq.params.max_new_tokens


class Scheduler:
    """See the module docstring."""

    def __init__(self):
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> bool:
        """Take ``seq`` out (freeing its slot); False when it was neither waiting nor running."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif any(s is seq for s in self.running):
            self.running = [s for s in self.running if s is not seq]
        else:
            return False
        seq.finish_reason = seq.finish_reason or "abort"
        return True

    @property
    def idle(self) -> bool:
        return not self.running

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self, slots: int, cache_len: int) -> list[Sequence]:
        """Move waiting sequences that fit (a free slot among ``slots``, at most ``cache_len``
        tokens) into running, in arrival order; each gets its slot. Returns them."""
        used = {s.slot for s in self.running}
        free = [i for i in range(slots) if i not in used]
        admitted = []
        while self.waiting and free and tokens_needed(self.waiting[0]) <= cache_len:
            seq = self.waiting.popleft()
            seq.slot = free.pop(0)
            seq.tokens = list(seq.prompt)
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    @staticmethod
    def prefill_groups(seqs: list[Sequence]) -> list[list[Sequence]]:
        """``seqs`` grouped by prompt length (in order of first appearance): one forward each."""
        groups: dict[int, list[Sequence]] = {}
        for s in seqs:
            groups.setdefault(len(s.prompt), []).append(s)
        return list(groups.values())

    def decoding(self) -> list[Sequence]:
        """The running sequences that decode this step, in slot order."""
        return sorted((s for s in self.running if not s.done), key=lambda s: s.slot)

    def retire(self) -> None:
        """Drop finished sequences from running (their slots are free again)."""
        self.running = [s for s in self.running if not s.done]
