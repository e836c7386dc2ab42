"""The bridge between the HTTP handlers (asyncio) and the engine's loop (one thread).

Handlers ``submit`` a ``Job`` (a validated prompt and its sampling parameters) and read its
events from an asyncio queue. The loop thread is the only caller of the engine: it adds new
jobs (``engine.add``), aborts those whose client left (``engine.abort``), runs ``engine.step()``
while there is work, and hands each new token to its job's event loop through
``loop.call_soon_threadsafe``. The number of jobs in the system is bounded (``QueueFull``: 429).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time

from ..engine.sequence import SamplingParams, Sequence
from ..parallel.comm import RankFailure
from .metrics import Metrics

log = logging.getLogger("tpllama.server")


class QueueFull(RuntimeError):
    """More jobs than ``max_batch + max_queue`` in the system."""


class Job:
    """One request's prompt, and the way back to its handler."""

    _ids = itertools.count(1)

    def __init__(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.id = next(Job._ids)
        self.prompt = prompt
        self.params = params
        self.seq: Sequence | None = None  # set by the loop thread when the engine takes the job
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.closed = False  # set by the loop thread once the job has left

    def put(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class EngineLoop:
    """See the module docstring. ``start()`` runs the loop in a daemon thread."""

    def __init__(self, engine, max_batch: int, max_queue: int, cache_len: int, on_failure=None):
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.on_failure = on_failure
        self.cond = threading.Condition()
        self.pending: list[Job] = []  # submitted, not yet given to the engine
        self.to_abort: list[Job] = []
        self.jobs: dict[int, Job] = {}  # id(seq) -> job, for every job the engine has
        self.in_system = 0
        self.counts = (0, 0)  # (waiting, running), as of the last step
        self._stop = False
        self.thread: threading.Thread | None = None
        self.metrics = Metrics(lambda: self.counts[0], lambda: self.counts[1], max_batch, lambda: self.alive)
        engine.reserve(max_batch, cache_len)

    # ------------------------------------------------------------------ called from the event loop
    def submit(self, job: Job) -> None:
        with self.cond:
            if self.failure:
                raise RankFailure(self.failure)
            if self._stop:
                raise RankFailure("the server is shutting down")
            if self.in_system >= self.max_batch + self.max_queue:
                raise QueueFull(
                    f"the server is at capacity ({self.max_batch} running + {self.max_queue} queued); retry later"
                )
            self.in_system += 1
            self.pending.append(job)
            self.counts = (self.counts[0] + 1, self.counts[1])
            self.cond.notify()

    def abort(self, job: Job) -> None:
        with self.cond:
            if not job.closed:
                self.to_abort.append(job)
                self.cond.notify()

    @property
    def failure(self) -> str | None:
        return self.engine.failure

    @property
    def alive(self) -> bool:
        return self.failure is None and self.thread is not None and self.thread.is_alive()

    # ------------------------------------------------------------------ lifecycle
    def warm_up(self) -> None:
        """One short prefill and decode step, so the first request does not pay for first-call costs."""
        seq = self.engine.add([self.engine.pad_id] * 4, SamplingParams(max_new_tokens=2).validate())
        self.engine.step()
        self.engine.abort(seq)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._main, name="tpllama-engine-loop", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    # ------------------------------------------------------------------ the loop thread
    def _main(self) -> None:
        why = None
        try:
            self._loop()
        except RankFailure as err:
            why = str(err)
        except BaseException as err:  # a bug: fail loudly rather than hang every client
            log.exception("the engine loop crashed")
            why = f"the engine loop crashed: {type(err).__name__}: {err}"
        finally:
            with self.cond:
                stopping = self._stop
                jobs = self.pending + list(self.jobs.values())
                self.pending, self.jobs = [], {}
            for job in jobs:
                job.closed = True
                job.put(("error", 503, self.failure or why or "the server is shutting down"))
            if not stopping:
                why = self.failure or why or "the engine loop stopped"
                log.error("rank failure: %s", why)
                if self.on_failure is not None:
                    self.on_failure(why)

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self.cond:
                while not (self._stop or self.pending or self.to_abort or engine.has_work()):
                    self.cond.wait(0.2)
                    if engine.failure:  # a worker died while the server was idle
                        raise RankFailure(engine.failure)
                if self._stop:
                    return
                new, self.pending = self.pending, []
                aborts, self.to_abort = self.to_abort, []
            for job in new:
                job.seq = engine.add(job.prompt, job.params)
                self.jobs[id(job.seq)] = job
            for job in aborts:
                self._abort(job)
            if engine.has_work():
                for seq, tok in engine.step():
                    job = self.jobs.get(id(seq))
                    if job is not None:
                        self._deliver(job, tok)
            sched = engine.scheduler
            with self.cond:
                self.counts = (len(self.pending) + len(sched.waiting), len(sched.running))

    def _leave(self, job: Job) -> None:
        with self.cond:
            self.jobs.pop(id(job.seq), None)
            self.in_system -= 1
            job.closed = True

    def _abort(self, job: Job) -> None:
        if job.closed:
            return
        if job.seq is not None:
            self.engine.abort(job.seq)
        else:
            with self.cond:
                self.pending.remove(job)
        self._leave(job)
        self.metrics.aborted.inc()

    def _deliver(self, job: Job, tok: int | None) -> None:
        seq = job.seq
        if tok is None:  # the sequence failed outside the model (sampling, stop check)
            self._leave(job)
            job.put(("error", 500, seq.error))
            return
        now = time.perf_counter()
        m = self.metrics
        if job.first_token_at is None:
            job.first_token_at = now
            m.ttft.observe(now - job.created)
            m.prompt_tokens.inc(len(seq.prompt))
        m.generation_tokens.inc()
        lp = seq.token_logprobs[-1] if seq.params.logprobs and seq.token_logprobs else None
        job.put(("token", tok, lp, seq.finish_reason))
        if seq.done:
            n = len(seq.generated)
            if n > 1:
                m.tpot.observe((now - job.first_token_at) / (n - 1))
            self._leave(job)
