"""OpenAI-compatible HTTP server (``tpllama serve``): FastAPI + uvicorn in front of the ranks.

Rank 0 (this process) tokenizes and validates every request completely before any rank sees
it; one scheduler thread (``server_sched.Scheduler``) runs all admitted requests together with
continuous batching. Endpoints: ``/v1/completions``, ``/v1/chat/completions`` (both with
``stream: true``), ``/v1/models``, ``/health``, ``/metrics`` (Prometheus text format).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .dist import RankFailure
from .generate import SamplingParams, Sequence
from .server_sched import Job, Metrics, QueueFull, Scheduler

log = logging.getLogger("tpllama.server")

MAX_BODY = 4 << 20  # bytes
TOKENIZE_CONCURRENCY = 2  # requests tokenized at once, off the event loop
MAX_LOGPROBS = 5
FAILURE_GRACE_S = 2.0  # after a rank failure: keep answering (503) this long, then exit


# ---------------------------------------------------------------------- errors
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


# ---------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    # strict: "1" is not an integer, true is not a number; ints are fine for floats
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    n: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[dict[str, Any]] = None
    ignore_eos: Optional[bool] = None
    user: Optional[str] = None
    logit_bias: Optional[dict[str, Any]] = None


class CompletionRequest(_Body):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Union[str, dict[str, Any], None] = None


# ---------------------------------------------------------------------- the app
class State:
    def __init__(self, engine, scheduler: Scheduler, metrics: Metrics, model_name: str, api_key: str | None,
                 cache_len: int):
        self.engine = engine
        self.scheduler = scheduler
        self.metrics = metrics
        self.model_name = model_name
        self.api_key = api_key
        self.cache_len = cache_len
        self.created = int(time.time())
        self.tok = engine.tokenizer
        # text longer than this cannot fit in the context whatever it says (checked before tokenizing)
        self.max_text_chars = cache_len * engine.tokenizer.max_token_chars() if engine.tokenizer is not None else 0
        self.tokenizing = asyncio.Semaphore(TOKENIZE_CONCURRENCY)

    # ------------------------------------------------------------------ helpers
    def check_model(self, name: str) -> None:
        if name not in (self.model_name, self.engine.info.get("path")):
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           "model", "model_not_found")

    def params(self, body: _Body, prompt_len: int, max_tokens: int | None, logprobs: int) -> SamplingParams:
        if body.n not in (None, 1):
            raise bad(f"n={body.n} is not supported; only n=1", "n")
        if body.logit_bias:
            raise bad("logit_bias is not supported", "logit_bias")
        room = self.cache_len - prompt_len
        if max_tokens is None:
            max_tokens = max(1, room)
        if isinstance(max_tokens, int) and max_tokens < 1:
            raise bad(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        stop = body.stop if body.stop is not None else ()
        if isinstance(stop, list) and len(stop) > 4:
            raise bad(f"at most 4 stop sequences, got {len(stop)}", "stop")
        if stop and self.tok is None:
            raise bad("stop strings need a tokenizer, and this model has none", "stop")
        # empty stop strings are refused by SamplingParams.validate, as in the Python API
        kw = dict(max_new_tokens=max_tokens, stop=stop, logprobs=logprobs, ignore_eos=bool(body.ignore_eos))
        for name, default in (("temperature", 1.0), ("top_p", 1.0), ("top_k", 0), ("repetition_penalty", 1.0),
                              ("frequency_penalty", 0.0), ("presence_penalty", 0.0), ("seed", None)):
            v = getattr(body, name)
            kw[name] = default if v is None else v
        if kw["top_k"] == -1:  # vLLM's spelling of "no top-k"
            kw["top_k"] = 0
        seed = kw["seed"]
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed < 1 << 63:
            raise bad(f"seed must be an integer in [0, 2**63), got {seed}", "seed")
        rp = kw["repetition_penalty"]
        if isinstance(rp, (int, float)) and not isinstance(rp, bool) and 0 < rp < 0.01:
            raise bad(f"repetition_penalty={rp!r} is out of range; allowed: [0.01, 100]", "repetition_penalty")
        try:
            p = SamplingParams(**kw).validate()
        except ValueError as err:
            msg = str(err).replace("max_new_tokens", "max_tokens")
            param = msg.split("=")[0].split(" ")[0]
            raise bad(msg, param if param in kw or param == "max_tokens" else None) from None
        if 0 < p.temperature < 1e-5:  # dividing logits by it would overflow: that is greedy anyway
            p.temperature = 0.0
        try:
            self.engine.check_length(prompt_len, p.max_new_tokens)
        except ValueError as err:
            raise bad(str(err).replace("max_new_tokens", "max_tokens"), "max_tokens", "context_length_exceeded") from None
        if prompt_len + p.max_new_tokens > self.cache_len:
            raise bad(f"prompt of {prompt_len} tokens + max_tokens {p.max_new_tokens} = {prompt_len + p.max_new_tokens} "
                      f"exceeds this server's context length {self.cache_len} (--max-seq-len)",
                      "max_tokens", "context_length_exceeded")
        return p

    def check_text_length(self, chars: int, param: str) -> None:
        """Refuse, without tokenizing it, text too long for the context in any tokenization."""
        if chars > self.max_text_chars:
            raise bad(f"the {param} has {chars} characters, more than fit in this server's context of {self.cache_len} "
                      f"tokens (no token of this vocabulary stands for more than "
                      f"{self.max_text_chars // self.cache_len} characters)", param, "context_length_exceeded")

    async def off_loop(self, fn, *args):
        """Run ``fn(*args)`` (tokenizing, rendering a chat template) on a worker thread, at most
        TOKENIZE_CONCURRENCY at a time, so that long texts never stall the event loop."""
        async with self.tokenizing:
            return await asyncio.to_thread(fn, *args)

    def check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise bad("the prompt is empty", param)
        try:
            self.engine.check_ids([ids])
        except ValueError as err:
            raise bad(str(err).replace("input_ids row 0", "the prompt"), param) from None

    def sequence(self, ids: list[int], params: SamplingParams) -> Sequence:
        return Sequence(prompt=ids, params=params, stop_check=self.engine._stop_checker(params.stop))

    def piece(self, tok: int) -> str:
        if self.tok is None:
            return f"token_id:{tok}"
        return self.tok.decode([tok], skip_special_tokens=False)

    def text(self, ids: list[int]) -> str:
        return self.tok.decode(ids) if self.tok is not None else ""


class Output:
    """Turns a job's tokens into text, incrementally (each token decodes only a short window):
    text is held back while it could still become a stop string or an incomplete UTF-8
    character, and truncated before the first stop string at the end. Streaming and
    non-streaming responses both go through it, so they agree."""

    def __init__(self, st: State, params: SamplingParams):
        self.st = st
        self.params = params
        self.ids: list[int] = []
        self.lps: list[dict] = []
        self.acc = ""  # the text of ids[:read_offset]
        self.prefix_offset = 0
        self.read_offset = 0
        self.sent = ""
        self.sent_lps = 0
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.finish: str | None = None

    def add(self, tok: int, lp: dict | None) -> None:
        self.ids.append(tok)
        if lp is not None:
            self.lps.append(lp)

    def _advance(self) -> None:
        if self.st.tok is None or self.read_offset >= len(self.ids):
            return
        prefix = self.st.text(self.ids[self.prefix_offset : self.read_offset])
        text = self.st.text(self.ids[self.prefix_offset :])
        if self.finish is not None or (len(text) > len(prefix) and not text.endswith("\ufffd")):
            self.acc += text[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)

    def _visible_ids(self) -> list[int]:
        ids = self.ids
        if self.finish == "stop" and ids and ids[-1] in self.st.engine.eos_ids and not self.params.ignore_eos:
            ids = ids[:-1]
        return ids

    def full_text(self) -> str:
        self._advance()
        text = self.acc
        if self.finish is not None and self.params.stop:
            cut = [text.find(s) for s in self.params.stop if s in text]
            if cut:
                text = text[: min(cut)]
        return text

    def new_text(self) -> str:
        """Text that is final now and was not handed out yet."""
        text = self.full_text()
        if self.finish is None and self.holdback:
            text = text[: max(0, len(text) - self.holdback)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        new = text[len(self.sent) :]
        self.sent = text
        return new

    def visible_lps(self) -> list[dict]:
        return self.lps[: len(self._visible_ids())]

    def new_lps(self) -> list[dict]:
        """Logprob entries not handed out yet (all of them once finished)."""
        lps = self.visible_lps()
        out = lps[self.sent_lps :]
        self.sent_lps = len(lps)
        return out


def completion_logprobs(st: State, lps: list[dict], k: int, offset: int) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    for e in lps:
        piece = st.piece(e["token"])
        tokens.append(piece)
        values.append(e["logprob"])
        tops.append({st.piece(t): v for t, v in e["top"][:k]} if k else None)
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(st: State, lps: list[dict], k: int) -> dict:
    def one(t: int, v: float) -> dict:
        piece = st.piece(t)
        return {"token": piece, "logprob": v, "bytes": list(piece.encode("utf-8"))}

    content = [dict(one(e["token"], e["logprob"]), top_logprobs=[one(t, v) for t, v in e["top"][:k]]) for e in lps]
    return {"content": content, "refusal": None}


def usage(prompt_len: int, completion_len: int) -> dict:
    return {"prompt_tokens": prompt_len, "completion_tokens": completion_len, "total_tokens": prompt_len + completion_len}


def build_app(st: State) -> FastAPI:
    app = FastAPI(title="tpllama", version="1", description="OpenAI-compatible tensor-parallel LLaMA server")
    app.state.tp = st

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return error_response(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        errors = err.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        else:
            where = ".".join(loc) or "body"
            msg, param = f"{where}: {first.get('msg', 'invalid value')}", (loc[0] if loc else None)
        return error_response(400, msg, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        type_ = "invalid_request_error" if err.status_code < 500 else "server_error"
        return error_response(err.status_code, str(err.detail), type_, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _any_error(request: Request, err: Exception):
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(err).__name__}", "server_error")

    # ------------------------------------------------------------------ plain endpoints
    @app.get("/health")
    async def health():
        sched = st.scheduler
        if not sched.alive:
            return JSONResponse({"status": "error", "error": sched.failure or "the scheduler is not running"}, 503)
        return {"status": "ok", "model": st.model_name, "world_size": st.engine.world_size,
                "running": sched.running_count(), "waiting": sched.queue_depth()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(st)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        st.check_model(model_id)
        return _model_card(st)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(st), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ completions
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        st.check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad(f"one prompt per request is supported, got a list of {len(prompt)}", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if st.tok is None:
                raise bad("this model has no tokenizer: send the prompt as a list of token ids", "prompt")
            if not prompt:
                raise bad("the prompt is empty", "prompt")
            st.check_text_length(len(prompt), "prompt")
            ids = await st.off_loop(st.tok.encode, prompt)
        else:
            ids = list(prompt)
        st.check_ids(ids, "prompt")
        if body.best_of not in (None, 1):
            raise bad(f"best_of={body.best_of} is not supported; only 1", "best_of")
        if body.suffix:
            raise bad("suffix is not supported", "suffix")
        k = body.logprobs
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise bad(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {k}", "logprobs")
        if body.echo and k is not None:
            raise bad("echo together with logprobs is not supported", "echo")
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        params = st.params(body, len(ids), max_tokens, 0 if k is None else max(1, k))
        prefix = (st.text(ids) if isinstance(prompt, list) else prompt) if body.echo else ""
        rid = f"cmpl-{uuid.uuid4().hex}"
        job = _submit(st, ids, params)
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": st.model_name}

        def lp_block(out: Output, lps: list[dict], offset: int):
            return completion_logprobs(st, lps, k, offset) if k is not None else None

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))

            async def events():
                out = Output(st, params)
                offset = len(prefix)
                if prefix:
                    yield _sse(dict(base, choices=[{"index": 0, "text": prefix, "logprobs": None, "finish_reason": None}]))
                async for _ in _tokens(st, job, out, request):
                    text = out.new_text()
                    if text or out.finish is not None:
                        lps = out.new_lps()
                        chunk = dict(base, choices=[{"index": 0, "text": text, "logprobs": lp_block(out, lps, offset),
                                                     "finish_reason": out.finish}])
                        offset += sum(len(st.piece(e["token"])) for e in lps)
                        if out.finish is not None:
                            chunk["usage"] = usage(len(ids), len(out.ids))
                        yield _sse(chunk)
                if include_usage:
                    yield _sse(dict(base, choices=[], usage=usage(len(ids), len(out.ids))))
                yield "data: [DONE]\n\n"

            return _stream(st, job, events(), "completions")

        out = Output(st, params)
        async for _ in _tokens(st, job, out, request):
            pass
        text = out.full_text()
        choice = {"index": 0, "text": prefix + text, "logprobs": lp_block(out, out.visible_lps(), len(prefix)),
                  "finish_reason": out.finish, "token_ids": out.ids}
        return dict(base, choices=[choice], usage=usage(len(ids), len(out.ids)))

    # ------------------------------------------------------------------ chat completions
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        st.check_model(body.model)
        if st.tok is None:
            raise bad("this model has no tokenizer, so it cannot serve chat completions; use /v1/completions "
                      "with token ids", "messages")
        if body.tools:
            raise bad("tools are not supported", "tools")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise bad("only response_format {\"type\": \"text\"} is supported", "response_format")
        messages = []
        for i, m in enumerate(body.messages):
            role = "system" if m.role == "developer" else m.role
            if role not in ("system", "user", "assistant", "tool"):
                raise bad(f"messages[{i}].role must be system, developer, user, assistant or tool, got {m.role!r}",
                          f"messages.{i}.role")
            content = m.content
            if content is None or content == []:
                raise bad(f"messages[{i}].content is required: a string or a non-empty list of text parts",
                          f"messages.{i}.content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise bad(f"messages[{i}].content: only text parts are supported", f"messages.{i}.content")
                    parts.append(part["text"])
                content = "".join(parts)
            messages.append({"role": role, "content": content})
        st.check_text_length(sum(len(m["content"]) for m in messages), "messages")
        try:
            ids = await st.off_loop(st.engine.encode_chat, messages)
        except Exception as err:  # the template refused the conversation
            raise bad(f"the chat template cannot render these messages: {err}", "messages") from None
        st.check_ids(ids, "messages")
        want_lp = bool(body.logprobs)
        k = body.top_logprobs
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise bad(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {k}", "top_logprobs")
        if k and not want_lp:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
        k = k or 0
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = st.params(body, len(ids), max_tokens, max(1, k) if want_lp else 0)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        job = _submit(st, ids, params)
        base = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": st.model_name}

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            cbase = dict(base, object="chat.completion.chunk")

            async def events():
                out = Output(st, params)
                yield _sse(dict(cbase, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]))
                async for _ in _tokens(st, job, out, request):
                    text = out.new_text()
                    if text or out.finish is not None:
                        lps = out.new_lps()
                        delta = {"content": text} if text else {}
                        chunk = dict(cbase, choices=[{"index": 0, "delta": delta,
                                                      "logprobs": chat_logprobs(st, lps, k) if want_lp else None,
                                                      "finish_reason": out.finish}])
                        if out.finish is not None:
                            chunk["usage"] = usage(len(ids), len(out.ids))
                        yield _sse(chunk)
                if include_usage:
                    yield _sse(dict(cbase, choices=[], usage=usage(len(ids), len(out.ids))))
                yield "data: [DONE]\n\n"

            return _stream(st, job, events(), "chat")

        out = Output(st, params)
        async for _ in _tokens(st, job, out, request):
            pass
        choice = {"index": 0, "message": {"role": "assistant", "content": out.full_text()},
                  "logprobs": chat_logprobs(st, out.visible_lps(), k) if want_lp else None,
                  "finish_reason": out.finish, "token_ids": out.ids}
        return dict(base, choices=[choice], usage=usage(len(ids), len(out.ids)))

    return app


def _model_card(st: State) -> dict:
    return {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "tpllama",
            "max_model_len": st.cache_len, "world_size": st.engine.world_size}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _submit(st: State, ids: list[int], params: SamplingParams) -> Job:
    job = Job(st.sequence(ids, params), asyncio.get_running_loop())
    try:
        st.scheduler.submit(job)
    except QueueFull as err:
        raise APIError(429, str(err), None, "rate_limit_exceeded", "rate_limit_error") from None
    except RankFailure as err:
        raise APIError(503, f"the model is unavailable: {err}", None, "service_unavailable", "server_error") from None
    return job


async def _tokens(st: State, job: Job, out: Output, request: Request):
    """Yield once per token of ``job`` (after adding it to ``out``); aborts the job if the client leaves."""
    finished = False
    checked = time.monotonic()
    try:
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                event = None
            if event is None or time.monotonic() - checked > 0.5:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if event is None:
                continue
            kind = event[0]
            if kind == "token":
                out.add(event[1], event[2])
                if event[3] is not None:  # the job's last token
                    out.finish = event[3]
                    finished = True
                    yield None
                    return
            else:  # error
                finished = True
                if event[1] == 503:
                    raise APIError(503, f"the model is unavailable: {event[2]}", None, "service_unavailable",
                                   "server_error")
                raise APIError(500, f"generation failed: {event[2]}", None, None, "server_error")
            yield None
    finally:
        if not finished:
            st.scheduler.abort(job)


def _stream(st: State, job: Job, gen, endpoint: str) -> StreamingResponse:
    async def guarded():
        try:
            async for item in gen:
                yield item
        except APIError as err:  # the headers are gone: report in-band, then end the stream
            yield _sse(error_body(err.message, err.type, err.param, err.code))
            yield "data: [DONE]\n\n"
        finally:
            st.scheduler.abort(job)  # no-op when it already finished

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------------- middleware (pure ASGI)
class Guard:
    """API key, body size limit and request counting, before FastAPI parses anything."""

    OPEN = ("/health",)
    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, st: State):
        self.app = app
        self.st = st

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = next((e for e in self.ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        status_box = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_counted, path)
        finally:
            self.st.metrics.count_request(endpoint, status_box[0])

    async def _handle(self, scope, receive, send, path):
        st = self.st
        if st.api_key and path not in self.OPEN:
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), st.api_key.encode()):
                resp = error_response(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                                      "invalid_request_error", None, "invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_big = error_response(413, f"the request body is larger than {MAX_BODY} bytes", code="request_too_large")
        if length is not None:
            try:
                if int(length) > MAX_BODY:
                    return await too_big(scope, receive, send)
            except ValueError:
                return await error_response(400, "bad Content-Length header")(scope, receive, send)
        # read the whole body (bounded), then replay it
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if path.startswith("/v1/") and ctype and ctype != "application/json" and not ctype.endswith("+json"):
            return await error_response(415, f"Content-Type must be application/json, got {ctype!r}",
                                        code="unsupported_media_type")(scope, receive, send)
        replayed = [False]

        async def replay():
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if path.startswith("/v1/") and body:
            try:  # NaN/Infinity are not JSON; refuse them as text rather than as numbers
                parsed = json.loads(body, parse_constant=_reject_constant)
            except ValueError as err:
                msg = str(err) if "not allowed" in str(err) else "the request body is not valid JSON"
                return await error_response(400, msg)(scope, receive, send)
            except RecursionError:
                return await error_response(400, "the request body is nested too deeply")(scope, receive, send)
            where = _not_unicode(parsed)
            if where is not None:
                return await error_response(400, f"{where or 'body'}: the string holds a lone UTF-16 surrogate escape "
                                                 f"(\\ud800-\\udfff not part of a pair), which is not Unicode text",
                                            param=where or None)(scope, receive, send)
        return await self.app(scope, replay, send)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON numbers")


def _not_unicode(value) -> str | None:
    """The path (``messages.0.content``) of the first string of a parsed JSON body, key or value,
    that cannot be encoded as UTF-8 (JSON allows lone surrogate escapes; text cannot hold them);
    None when every string is fine."""
    stack = [(value, "")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return path
        elif isinstance(v, dict):
            for k, item in v.items():
                key_path = f"{path}.{k}" if path else str(k)
                if _not_unicode(k) is not None:
                    return path or "body"
                stack.append((item, key_path))
        elif isinstance(v, list):
            stack.extend((item, f"{path}.{i}" if path else str(i)) for i, item in enumerate(v))
    return None


# ---------------------------------------------------------------------- metrics
def render_metrics(st: State) -> str:
    m, sched = st.metrics, st.scheduler
    lines = []

    def metric(name: str, kind: str, help_: str, rows: list[str]):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(rows)

    with m.lock:
        reqs = sorted(m.requests.items())
        metric("tpllama_http_requests_total", "counter", "HTTP requests by endpoint and status code.",
               [f'tpllama_http_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in reqs])
        metric("tpllama_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [f"tpllama_prompt_tokens_total {m.prompt_tokens}"])
        metric("tpllama_generation_tokens_total", "counter", "Tokens generated.",
               [f"tpllama_generation_tokens_total {m.generation_tokens}"])
        metric("tpllama_requests_aborted_total", "counter", "Requests aborted (client gone).",
               [f"tpllama_requests_aborted_total {m.aborted}"])
        ttft, tpot = m.ttft.lines("tpllama_time_to_first_token_seconds"), m.tpot.lines("tpllama_time_per_output_token_seconds")
    metric("tpllama_requests_waiting", "gauge", "Requests queued for a KV-cache slot.",
           [f"tpllama_requests_waiting {sched.queue_depth()}"])
    metric("tpllama_requests_running", "gauge", "Requests decoding in a KV-cache slot.",
           [f"tpllama_requests_running {sched.running_count()}"])
    metric("tpllama_kv_slots", "gauge", "KV-cache slots (--max-batch).", [f"tpllama_kv_slots {sched.max_batch}"])
    metric("tpllama_healthy", "gauge", "1 while every rank is up.", [f"tpllama_healthy {int(sched.alive)}"])
    metric("tpllama_time_to_first_token_seconds", "histogram", "Time from arrival to first token.", ttft)
    metric("tpllama_time_per_output_token_seconds", "histogram", "Mean time per output token after the first, per request.", tpot)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- running it
class _Server(uvicorn.Server):
    def __init__(self, config, banner: str):
        super().__init__(config)
        self.banner = banner

    @contextlib.contextmanager
    def capture_signals(self):
        """Like uvicorn's, minus re-raising the signal afterwards: ``main`` closes the ranks and
        returns 0 after a SIGINT/SIGTERM shutdown."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started:
            banner = self.banner
            if self.config.port == 0 and getattr(self, "servers", None):  # --port 0: say which one we got
                port = self.servers[0].sockets[0].getsockname()[1]
                banner = banner.rsplit(":", 1)[0] + f":{port}"
            print(banner, flush=True)


def run_server(a: argparse.Namespace) -> int:
    """Load the engine and serve until SIGINT/SIGTERM or a rank failure (flags: ``server_cli``)."""
    from .cli import open_engine

    engine = open_engine(a)
    try:
        cache_len = min(engine.args.max_seq_len, a.max_seq_len or 4096)
        name = a.served_model_name or _default_name(engine)
        metrics = Metrics()
        server_box: list[_Server] = []

        def on_failure(why: str) -> None:
            print(f"tpllama: rank failure: {why}; stopping the server", file=sys.stderr, flush=True)

            def stop():
                time.sleep(FAILURE_GRACE_S)
                if server_box:
                    server_box[0].should_exit = True

            threading.Thread(target=stop, daemon=True).start()

        sched = Scheduler(engine, a.max_batch, a.max_queue, cache_len, metrics, on_failure)
        sched.warm_up()
        st = State(engine, sched, metrics, name, a.api_key, cache_len)
        app = Guard(build_app(st), st)
        config = uvicorn.Config(app, host=a.host, port=a.port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5, lifespan="off")
        server = _Server(config, f"serving {name} on http://{a.host}:{a.port}")
        server_box.append(server)
        sched.start()
        server.run()
        log.info("http server stopped")
        sched.stop()
        log.info("scheduler stopped")
        if sched.failure:
            print(f"tpllama: rank failure: {sched.failure}", file=sys.stderr, flush=True)
            return 1
        if not server.started:
            return 1
        return 0
    finally:
        engine.close()
        log.info("ranks closed")


def _default_name(engine) -> str:
    p = Path(engine.info.get("path") or "model")
    return p.stem if p.suffix == ".gguf" else p.name
