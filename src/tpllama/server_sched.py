"""The server's scheduler: one thread on rank 0 that owns the decoder (continuous batching).

HTTP handlers ``submit`` a ``Job`` (one sequence) and read its events from an asyncio queue;
the scheduler thread admits waiting jobs into free KV-cache slots (prefill), runs one decode
step for every running job, and hands each new token to its job's event loop through
``loop.call_soon_threadsafe``. Jobs leave when they finish or are aborted (client gone).
Every model call happens on this one thread, so the ranks see rank 0's broadcasts in order.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time

from .dist import RankFailure
from .generate import Decoder, Sequence

log = logging.getLogger("tpllama.server")


class QueueFull(RuntimeError):
    """More jobs than ``max_batch + max_queue`` in the system."""


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b:g}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) -> n
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.aborted = 0
        self.ttft = Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tpot = Histogram((0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5))

    def count_request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1


class Job:
    """One sequence of one request, and the way back to its handler."""

    _ids = itertools.count(1)

    def __init__(self, seq: Sequence, loop: asyncio.AbstractEventLoop):
        self.id = next(Job._ids)
        self.seq = seq
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.closed = False  # set by the scheduler thread once the job has left

    def _put(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class Scheduler:
    """See the module docstring. ``start()`` runs the loop in a daemon thread."""

    def __init__(self, engine, max_batch: int, max_queue: int, cache_len: int, metrics: Metrics, on_failure=None):
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.cache_len = cache_len
        self.metrics = metrics
        self.on_failure = on_failure
        self.cond = threading.Condition()
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[int, Job] = {}  # id(seq) -> job
        self.to_abort: list[Job] = []
        self.in_system = 0
        self.failure: str | None = None
        self._stop = False
        self.thread: threading.Thread | None = None
        engine.runner.ensure_cache(max_batch, cache_len)
        self._in_forward = False
        self.decoder = Decoder(self._forward, max_batch, engine.eos_ids, engine.pad_id)

    def _forward(self, *args):
        self._in_forward = True
        out = self.engine.runner.forward(*args)
        self._in_forward = False
        return out

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
            self.waiting.append(job)
            self.cond.notify()

    def abort(self, job: Job) -> None:
        with self.cond:
            if not job.closed:
                self.to_abort.append(job)
                self.cond.notify()

    def queue_depth(self) -> int:
        with self.cond:
            return len(self.waiting)

    def running_count(self) -> int:
        with self.cond:
            return len(self.running)

    # ------------------------------------------------------------------ lifecycle
    def warm_up(self) -> None:
        """One short prefill and decode step, so the first request does not pay for first-call costs."""
        from .generate import SamplingParams

        seq = Sequence(prompt=[self.engine.pad_id] * 4, params=SamplingParams(max_new_tokens=2).validate())
        self.decoder.add(seq)
        if self.decoder.running:
            self.decoder.step()
        self.decoder.abort(seq)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._main, name="tpllama-scheduler", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.failure is None and self.thread is not None and self.thread.is_alive()

    # ------------------------------------------------------------------ the scheduler thread
    def _main(self) -> None:
        try:
            self._loop()
        except RankFailure as err:
            self._fail(str(err))
        except BaseException as err:  # a bug: fail loudly rather than hang every client
            log.exception("scheduler crashed")
            self._fail(f"scheduler crashed: {type(err).__name__}: {err}")
        finally:
            with self.cond:
                stopping = self._stop
                jobs = list(self.waiting) + list(self.running.values())
                self.waiting.clear()
                self.running.clear()
            for job in jobs:
                job.closed = True
                job._put(("error", 503, self.failure or "the server is shutting down"))
            if not stopping and self.failure is None:
                self._fail("the scheduler stopped")

    def _fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
            log.error("rank failure: %s", why)
            if self.on_failure is not None:
                self.on_failure(why)

    class RequestError(Exception):
        """A decoder call failed outside the model's forward (sampling, stop check): the ranks are
        still in step, so only the sequences involved fail."""

    def _model_call(self, fn, *args):
        """Run a decoder call; a failure of the ranks becomes RankFailure (the engine is then broken)."""
        self._in_forward = False
        try:
            return fn(*args)
        except RankFailure:
            raise
        except Exception as err:
            if not self._in_forward:  # before or after the model ran: the ranks are fine
                log.exception("request failed outside the model call")
                raise Scheduler.RequestError(f"{type(err).__name__}: {err}") from err
            if self.engine.world_size == 1 or not isinstance(err, (RuntimeError, OSError)):
                raise
            self.engine._fail(err)  # kills the workers, marks the engine broken, raises RankFailure

    def _check_workers(self) -> None:
        w = self.engine.workers
        if w is not None and w.failure:
            self.engine._broken = w.failure
            w.kill()
            raise RankFailure(w.failure)

    def _loop(self) -> None:
        dec = self.decoder
        while True:
            with self.cond:
                while not self._stop and not self.waiting and not self.running and not self.to_abort:
                    self.cond.wait(0.2)
                    self._check_workers()
                if self._stop:
                    return
                aborts, self.to_abort = self.to_abort, []
            self._check_workers()
            for job in aborts:
                self._abort(job)
            # admit waiting jobs into free slots (prefill), then one decode step for all
            while dec.free_slots() > 0:
                with self.cond:
                    if not self.waiting:
                        break
                    job = self.waiting.popleft()
                    self.running[id(job.seq)] = job
                try:
                    tok = self._model_call(dec.add, job.seq)
                except Scheduler.RequestError as err:
                    self._error(job, str(err))
                    continue
                self._deliver(job, tok)
            if dec.running:
                try:
                    pairs = self._model_call(dec.step)
                except Scheduler.RequestError as err:
                    for job in list(self.running.values()):
                        self._error(job, str(err))
                    continue
                for seq, tok in pairs:
                    job = self.running.get(id(seq))
                    if job is not None:
                        self._deliver(job, tok)

    def _abort(self, job: Job) -> None:
        with self.cond:
            if job.closed:
                return
            try:
                self.waiting.remove(job)
            except ValueError:
                pass
            self.running.pop(id(job.seq), None)
            self.in_system -= 1
            job.closed = True
        self.decoder.abort(job.seq)
        with self.metrics.lock:
            self.metrics.aborted += 1

    def _error(self, job: Job, why: str) -> None:
        self._abort(job)
        job._put(("error", 500, why))

    def _deliver(self, job: Job, tok: int) -> None:
        now = time.perf_counter()
        seq = job.seq
        m = self.metrics
        if job.first_token_at is None:
            job.first_token_at = now
            with m.lock:
                m.ttft.observe(now - job.created)
                m.prompt_tokens += len(seq.prompt)
        job.last_token_at = now
        with m.lock:
            m.generation_tokens += 1
        lp = seq.token_logprobs[-1] if seq.params.logprobs and seq.token_logprobs else None
        job._put(("token", tok, lp, seq.finish_reason))
        if seq.done:
            n = len(seq.generated)
            if n > 1:
                with m.lock:
                    m.tpot.observe((now - job.first_token_at) / (n - 1))
            with self.cond:
                self.running.pop(id(seq), None)
                self.in_system -= 1
                job.closed = True
