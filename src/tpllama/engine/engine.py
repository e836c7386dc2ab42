"""The engine and its one loop.

``Engine.add`` checks a request completely (before any rank sees it) and queues its sequence;
``Engine.step`` runs one step of the loop: it admits waiting sequences into free KV-cache slots
and prefills them (several prompts in one forward where their lengths agree), then decodes one
token for every running sequence, and returns the new tokens. ``generate``, ``iterate``,
``stream``, ``tpllama run`` and the server all drive this loop; nothing else calls the model.

Rank 0 (this process) owns tokenization, validation and sampling; the ``ModelRunner`` carries
each step to the other ranks. A failure of the ranks is recorded in one place (``failure``) and
ends the engine: every later call raises ``RankFailure``.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator, Sequence as Seq

import torch

from ..config import EngineConfig, ModelArgs
from ..parallel.comm import Communicator, RankFailure
from ..parallel.plan import RankShare
from ..weights.tokenizer import Tokenizer, special_ids
from .inputs import rows_from_inputs
from .runner import ModelRunner
from .sampler import sample
from .scheduler import Scheduler, tokens_needed
from .sequence import SamplingParams, Sequence

log = logging.getLogger("tpllama")

CACHE_COLUMNS_STEP = 256  # the KV cache grows in steps of this many columns


class Engine:
    """A loaded model on ``world_size`` ranks. Use as a context manager, or call ``close()``.

    One thread drives the loop (``add``/``abort``/``step``, or ``generate``/``iterate``/``stream``
    which call them); the server gives it a thread of its own."""

    def __init__(self, config: EngineConfig, args: ModelArgs, runner: ModelRunner, tokenizer: Tokenizer | None,
                 shares: list[RankShare], comm: Communicator, workers, info: dict):
        self.config = config
        self.args = args
        self.runner = runner
        self.tokenizer = tokenizer
        self.shares = shares
        self.comm = comm
        self.workers = workers  # parallel.launch.Workers when this process started the other ranks
        self.info = info
        self.world_size = len(shares)
        self.eos_ids, self.pad_id = special_ids(args.eos_token_ids, args.pad_token_id, tokenizer, args.vocab_size)
        self.scheduler = Scheduler()
        self._failure: str | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle and health
    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.failure is None:
                self.runner.stop()
        except Exception:  # the other ranks may already be gone
            pass
        if self.workers is not None:
            self.workers.close()
        self.comm.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def failure(self) -> str | None:
        """Why the ranks failed, or None while they are fine (a worker that died is noticed by
        the launcher's watchdog within 0.2 s)."""
        if self._failure is None and self.workers is not None and self.workers.failure:
            self._failure = self.workers.failure
            self.workers.kill()
        return self._failure

    def _check_alive(self) -> None:
        if self._closed:
            raise RuntimeError("this engine is closed")
        if self.failure:
            raise RankFailure(self.failure)

    def _fail(self, err: BaseException):
        why = self.workers.failure if self.workers is not None and self.workers.failure else None
        self._failure = f"{why or 'a rank failed'} ({type(err).__name__}: {str(err).splitlines()[0][:300]})"
        if self.workers is not None:
            self.workers.kill()
        raise RankFailure(self._failure) from err

    # ------------------------------------------------------------------ validation
    def check_ids(self, rows: Seq[Seq[int]]) -> None:
        v = self.args.vocab_size
        for b, row in enumerate(rows):
            if len(row) == 0:
                raise ValueError(f"row {b} of input_ids has no tokens (after removing padding)")
            lo, hi = min(row), max(row)
            if lo < 0 or hi >= v:
                bad = lo if lo < 0 else hi
                raise ValueError(f"input_ids row {b} holds token id {bad}; allowed: 0 <= id < vocab_size ({v})")

    @property
    def context_len(self) -> int:
        """Tokens a sequence may hold: the model's context, or the config's ``max_seq_len``."""
        return min(self.args.max_seq_len, self.config.max_seq_len or self.args.max_seq_len)

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        limit = self.context_len
        if prompt_len + max_new_tokens > limit:
            what = "the model's context length" if limit == self.args.max_seq_len else "this engine's max_seq_len"
            raise ValueError(
                f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} = {prompt_len + max_new_tokens} "
                f"exceeds {what} {limit}"
            )

    def sampling_params(self, max_new_tokens: int, **sampling) -> SamplingParams:
        """Checked sampling parameters (ValueError naming what is wrong and what is allowed)."""
        try:
            params = SamplingParams(max_new_tokens=max_new_tokens, **sampling)
        except TypeError as err:
            raise ValueError(f"unknown sampling parameter: {err}") from None
        params.validate()
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this checkpoint has none")
        return params

    def _stop_checker(self, stops: tuple[str, ...]):
        if not stops:
            return None
        tok = self.tokenizer

        def check(generated: list[int]) -> bool:
            text = tok.decode(generated[-64:])
            return any(s in text for s in stops)

        return check

    # ------------------------------------------------------------------ the loop
    def add(self, prompt: Seq[int], params: SamplingParams) -> Sequence:
        """Check one prompt (token ids, no padding) and queue it; returns its sequence."""
        self._check_alive()
        row = [int(t) for t in prompt]
        self.check_ids([row])
        self.check_length(len(row), params.max_new_tokens)
        seq = Sequence(prompt=row, params=params, stop_check=self._stop_checker(params.stop))
        if params.seed is not None or not params.greedy:
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            seq.generator = torch.Generator().manual_seed(seed)
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop ``seq`` now (waiting or running) and free its slot."""
        self.scheduler.abort(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def reserve(self, slots: int, length: int) -> None:
        """Size the KV cache now for ``slots`` sequences of ``length`` tokens (it otherwise grows
        as needed, while no sequence runs)."""
        self._check_alive()
        self._model_call(self.runner.ensure_cache, slots, length)

    def step(self) -> list[tuple[Sequence, int | None]]:
        """One step of the loop; returns (sequence, new token) pairs. A sequence that fails
        outside the model (sampling, stop check) ends with finish_reason "error" and token None."""
        self._check_alive()
        sched = self.scheduler
        if sched.idle and sched.waiting:
            self._grow_cache()
        cache = self.runner.model.cache
        new = sched.admit(cache.slots, cache.max_len) if cache is not None else []
        out: list[tuple[Sequence, int | None]] = []
        for group in sched.prefill_groups(new):
            n = len(group[0].prompt)
            tokens = torch.tensor([s.prompt for s in group], dtype=torch.int64)
            positions = torch.arange(n, dtype=torch.int64).expand(len(group), n)
            logits = self._model_call(self.runner.forward, tokens, positions, _rows([s.slot for s in group]))
            out += self._accept(logits[:, -1, :], group)
        running = sched.decoding()
        if running:
            tokens = torch.tensor([[s.tokens[-1]] for s in running], dtype=torch.int64)
            positions = torch.tensor([[len(s.tokens) - 1] for s in running], dtype=torch.int64)
            logits = self._model_call(self.runner.forward, tokens, positions, _rows([s.slot for s in running]))
            out += self._accept(logits[:, -1, :], running)
        sched.retire()
        return out

    def _grow_cache(self) -> None:
        """While nothing runs: room for the waiting sequences (up to ``max_batch`` of them) and
        the longest of them (in steps of CACHE_COLUMNS_STEP, up to the context)."""
        waiting = self.scheduler.waiting
        slots = len(waiting) if self.config.max_batch is None else min(len(waiting), self.config.max_batch)
        need = max(tokens_needed(s) for s in list(waiting)[:slots])
        length = self.config.max_seq_len or min(self.args.max_seq_len, -(-need // CACHE_COLUMNS_STEP) * CACHE_COLUMNS_STEP)
        cache = self.runner.model.cache
        if cache is None or cache.slots < slots or cache.max_len < need:
            self._model_call(self.runner.ensure_cache, max(slots, cache.slots if cache else 0),
                             max(length, cache.max_len if cache else 0))

    def _model_call(self, fn, *args):
        """Run a call that involves every rank; a failure of the ranks ends the engine."""
        try:
            return fn(*args)
        except RankFailure as err:
            self._fail(err)
        except (RuntimeError, OSError) as err:
            if self.world_size == 1:
                raise
            self._fail(err)

    def _accept(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[tuple[Sequence, int | None]]:
        """Sample each row's next token and decide whether its sequence is finished."""
        try:
            next_ids = sample(logits, seqs).tolist()
            want_lp = max(s.params.logprobs for s in seqs)
            logp = logits.log_softmax(-1) if want_lp else None
            for i, (s, tok) in enumerate(zip(seqs, next_ids)):
                s.tokens.append(tok)
                if logp is not None and s.params.logprobs:
                    top = torch.topk(logp[i], s.params.logprobs)
                    s.token_logprobs.append({"token": tok, "logprob": float(logp[i, tok]),
                                             "top": list(zip(top.indices.tolist(), top.values.tolist()))})
                if tok in self.eos_ids and not s.params.ignore_eos:
                    s.finish_reason = "stop"
                elif s.stop_check is not None and s.stop_check(s.generated):
                    s.finish_reason = "stop"
                elif len(s.generated) >= s.params.max_new_tokens:
                    s.finish_reason = "length"
        except Exception as err:  # outside the model: the ranks are in step, only these sequences fail
            log.exception("a request failed outside the model call")
            for s in seqs:
                if not s.done:
                    s.finish_reason, s.error = "error", f"{type(err).__name__}: {err}"
            return [(s, None) for s in seqs]
        return list(zip(seqs, next_ids))

    def run(self, seqs: list[Sequence]) -> Iterator[tuple[Sequence, int]]:
        """Drive the loop until every one of ``seqs`` is finished; yield their new tokens. If the
        caller stops early, the unfinished ones are aborted."""
        mine = {id(s) for s in seqs}
        try:
            while any(not s.done for s in seqs):
                for s, tok in self.step():
                    if id(s) not in mine:
                        continue
                    if tok is None:
                        raise RuntimeError(f"generation failed: {s.error}")
                    yield s, tok
        finally:
            for s in seqs:
                if not s.done:
                    self.abort(s)

    # ------------------------------------------------------------------ drivers
    def iterate(self, prompts: Seq[Seq[int]], max_new_tokens: int = 32, **sampling) -> Iterator[tuple[int, int]]:
        """Run prompts (lists of token ids, no padding) together; yield (row, new token) as made."""
        params = self.sampling_params(max_new_tokens, **sampling)
        rows = [[int(t) for t in p] for p in prompts]
        self.check_ids(rows)
        for row in rows:
            self.check_length(len(row), params.max_new_tokens)
        seqs = [self.add(row, params) for row in rows]
        index = {id(s): i for i, s in enumerate(seqs)}
        for s, tok in self.run(seqs):
            yield index[id(s)], tok

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, **sampling) -> torch.Tensor:
        """The seed's contract: input_ids int64 [B, S] (+ optional mask) -> output_ids int64 [B, S + new].

        Greedy by default; sampling keywords are those of ``SamplingParams`` (temperature,
        top_k, top_p, repetition_penalty, seed, stop, ...). Each row stops at EOS and is padded
        after it with the pad id. Padding (2-D 0/1 mask or 4-D additive mask) is removed per row,
        so a padded batch gives, row by row, the tokens of each row alone."""
        params = self.sampling_params(max_new_tokens, **sampling)
        ids, rows = rows_from_inputs(input_ids, attention_mask)
        self.check_ids(rows)
        for row in rows:
            self.check_length(len(row), params.max_new_tokens)
        seqs = [self.add(row, params) for row in rows]
        for _ in self.run(seqs):
            pass
        new = max(len(s.generated) for s in seqs)
        out = torch.full((ids.shape[0], ids.shape[1] + new), self.pad_id, dtype=torch.int64)
        out[:, : ids.shape[1]] = ids
        for b, s in enumerate(seqs):
            g = s.generated
            out[b, ids.shape[1] : ids.shape[1] + len(g)] = torch.tensor(g, dtype=torch.int64)
        return out

    def stream(self, prompt_ids: Seq[int], max_new_tokens: int = 256, **sampling) -> Iterator[int]:
        """Yield the new token ids of one prompt as they are made."""
        for _, tok in self.iterate([prompt_ids], max_new_tokens, **sampling):
            yield tok

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass token ids instead of text")
        return self.tokenizer.chat(messages)


def _rows(slots: list[int]) -> slice | torch.Tensor:
    """The KV-cache rows of ``slots``: a slice when they are consecutive, else an index tensor."""
    if slots == list(range(slots[0], slots[0] + len(slots))):
        return slice(slots[0], slots[0] + len(slots))
    return torch.tensor(slots, dtype=torch.int64)
