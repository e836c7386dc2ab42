"""OpenAI-compatible HTTP server (``tpllama serve``): FastAPI + uvicorn in front of the ranks.

Rank 0 (this process) tokenizes and validates every request completely before any rank sees
it; the engine's loop runs all admitted requests together with continuous batching, on a thread
of its own (``bridge.EngineLoop``). Endpoints: ``/v1/completions``, ``/v1/chat/completions``
(both with ``stream: true``), ``/v1/models``, ``/health``, ``/metrics`` (Prometheus).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import EngineConfig
from ..engine.sequence import SamplingParams
from ..parallel.early import EarlyWorkers
from ..parallel.comm import RankFailure
from .bridge import EngineLoop, Job, QueueFull
from .protocol import (APIError, ChatRequest, CompletionRequest, Detokenizer, Output, RequestBody, bad,
                       chat_logprobs, completion_logprobs, error_body, error_response, not_unicode, reject_constant,
                       usage)

log = logging.getLogger("tpllama.server")

MAX_BODY = 4 << 20  # bytes
TOKENIZE_CONCURRENCY = 2  # requests tokenized at once, off the event loop
TOKENIZE_NICENESS = 10  # tokenizing threads yield the CPU to the event loop (and to the ranks)
MAX_LOGPROBS = 5
FAILURE_GRACE_S = 2.0  # after a rank failure: keep answering (503) this long, then exit


# ---------------------------------------------------------------------- the app
def _lower_thread_priority() -> None:
    """Make the calling thread (not the process) nicer, where the OS allows it (Linux)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), TOKENIZE_NICENESS)


class State:
    def __init__(self, engine, loop: EngineLoop, model_name: str, api_key: str | None):
        self.engine = engine
        self.loop = loop
        self.metrics = loop.metrics
        self.model_name = model_name
        self.api_key = api_key
        self.cache_len = engine.context_len
        self.created = int(time.time())
        self.tok = engine.tokenizer
        self.detok = Detokenizer(engine.tokenizer)
        # text longer than this cannot fit in the context whatever it says (checked before tokenizing)
        self.max_text_chars = self.cache_len * self.tok.max_token_chars() if self.tok is not None else 0
        self.tokenizing = ThreadPoolExecutor(TOKENIZE_CONCURRENCY, thread_name_prefix="tpllama-tokenize",
                                             initializer=_lower_thread_priority)

    # ------------------------------------------------------------------ helpers
    def check_model(self, name: str) -> None:
        if name not in (self.model_name, self.engine.info.get("path")):
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`",
                           "model", "model_not_found")

    def output(self, params: SamplingParams) -> Output:
        return Output(self.detok, self.engine.eos_ids, params)

    def params(self, body: RequestBody, prompt_len: int, max_tokens: int | None, logprobs: int) -> SamplingParams:
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
        """Run ``fn(*args)`` (tokenizing, rendering a chat template) on one of TOKENIZE_CONCURRENCY
        low-priority threads, so that long texts never stall the event loop, even on a busy 2-core
        machine."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)

    def check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise bad("the prompt is empty", param)
        try:
            self.engine.check_ids([ids])
        except ValueError as err:
            raise bad(str(err).replace("input_ids row 0", "the prompt"), param) from None


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
        loop = st.loop
        if not loop.alive:
            return JSONResponse({"status": "error", "error": loop.failure or "the engine loop is not running"}, 503)
        waiting, running = loop.counts
        return {"status": "ok", "model": st.model_name, "world_size": st.engine.world_size,
                "running": running, "waiting": waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(st)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        st.check_model(model_id)
        return _model_card(st)

    @app.get("/metrics")
    async def metrics():
        return Response(st.metrics.render(), media_type=st.metrics.content_type)

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
        prefix = (st.detok.text(ids) if isinstance(prompt, list) else prompt) if body.echo else ""
        job = _submit(st, ids, params)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": st.model_name}
        out = st.output(params)

        def lp_block(lps: list[dict], offset: int):
            return completion_logprobs(st.detok, lps, k, offset) if k is not None else None

        if body.stream:
            offset = len(prefix)

            def choice(text: str, lps: list[dict]) -> dict:
                nonlocal offset
                block = lp_block(lps, offset)
                offset += sum(len(st.detok.piece(e["token"])) for e in lps)
                return {"text": text, "logprobs": block}

            first = {"index": 0, "text": prefix, "logprobs": None, "finish_reason": None} if prefix else None
            return _sse_response(st, job, out, request, base, first, choice, body.stream_options, len(ids))

        async for _ in _tokens(st, job, out, request):
            pass
        choice = {"index": 0, "text": prefix + out.full_text(), "logprobs": lp_block(out.visible_lps(), len(prefix)),
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
        job = _submit(st, ids, params)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": st.model_name}
        out = st.output(params)
        if body.stream:
            def choice(text: str, lps: list[dict]) -> dict:
                return {"delta": {"content": text} if text else {},
                        "logprobs": chat_logprobs(st.detok, lps, k) if want_lp else None}

            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            return _sse_response(st, job, out, request, dict(base, object="chat.completion.chunk"), first, choice,
                                 body.stream_options, len(ids))

        async for _ in _tokens(st, job, out, request):
            pass
        choice = {"index": 0, "message": {"role": "assistant", "content": out.full_text()},
                  "logprobs": chat_logprobs(st.detok, out.visible_lps(), k) if want_lp else None,
                  "finish_reason": out.finish, "token_ids": out.ids}
        return dict(base, choices=[choice], usage=usage(len(ids), len(out.ids)))

    return app


def _model_card(st: State) -> dict:
    return {"id": st.model_name, "object": "model", "created": st.created, "owned_by": "tpllama",
            "max_model_len": st.cache_len, "world_size": st.engine.world_size}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _submit(st: State, ids: list[int], params: SamplingParams) -> Job:
    job = Job(ids, params, asyncio.get_running_loop())
    try:
        st.loop.submit(job)
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
            st.loop.abort(job)


def _sse_response(st: State, job: Job, out: Output, request: Request, base: dict, first: dict | None, choice,
                  stream_options: dict | None, prompt_len: int) -> StreamingResponse:
    """The server-sent events of one streaming response, for both endpoints: ``first`` (if any),
    then a chunk whenever new text is final (``choice(text, new logprob entries)`` gives the
    endpoint's fields), the last one with ``finish_reason`` and usage, then ``[DONE]``. An error
    after the headers went out is reported in-band."""
    include_usage = bool((stream_options or {}).get("include_usage"))

    async def events():
        try:
            if first is not None:
                yield _sse(dict(base, choices=[first]))
            async for _ in _tokens(st, job, out, request):
                text = out.new_text()
                if text or out.finish is not None:
                    chunk = dict(base, choices=[dict(index=0, **choice(text, out.new_lps()), finish_reason=out.finish)])
                    if out.finish is not None:
                        chunk["usage"] = usage(prompt_len, len(out.ids))
                    yield _sse(chunk)
            if include_usage:
                yield _sse(dict(base, choices=[], usage=usage(prompt_len, len(out.ids))))
            yield "data: [DONE]\n\n"
        except APIError as err:  # the headers are gone: report in-band, then end the stream
            yield _sse(error_body(err.message, err.type, err.param, err.code))
            yield "data: [DONE]\n\n"
        finally:
            st.loop.abort(job)  # no-op when it already finished

    return StreamingResponse(events(), media_type="text/event-stream",
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
                parsed = json.loads(body, parse_constant=reject_constant)
            except ValueError as err:
                msg = str(err) if "not allowed" in str(err) else "the request body is not valid JSON"
                return await error_response(400, msg)(scope, receive, send)
            except RecursionError:
                return await error_response(400, "the request body is nested too deeply")(scope, receive, send)
            where = not_unicode(parsed)
            if where is not None:
                return await error_response(400, f"{where or 'body'}: the string holds a lone UTF-16 surrogate escape "
                                                 f"(\\ud800-\\udfff not part of a pair), which is not Unicode text",
                                            param=where or None)(scope, receive, send)
        return await self.app(scope, replay, send)


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


def run_server(a: argparse.Namespace, cfg: EngineConfig, early: EarlyWorkers | None = None) -> int:
    """Load the engine of ``cfg`` and serve until SIGINT/SIGTERM or a rank failure (flags:
    ``serve.cli``; ``early``: its ranks 1..N-1, started already)."""
    from ..engine.load import start

    engine = start(cfg, early)
    try:
        name = a.served_model_name or _default_name(engine)
        server_box: list[_Server] = []

        def on_failure(why: str) -> None:
            print(f"tpllama: rank failure: {why}; stopping the server", file=sys.stderr, flush=True)

            def stop():
                time.sleep(FAILURE_GRACE_S)
                if server_box:
                    server_box[0].should_exit = True

            threading.Thread(target=stop, daemon=True).start()

        loop = EngineLoop(engine, a.max_batch, a.max_queue, engine.context_len, on_failure)
        loop.warm_up()
        st = State(engine, loop, name, a.api_key)
        app = Guard(build_app(st), st)
        config = uvicorn.Config(app, host=a.host, port=a.port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5, lifespan="off")
        server = _Server(config, f"serving {name} on http://{a.host}:{a.port}")
        server_box.append(server)
        loop.start()
        server.run()
        st.tokenizing.shutdown(wait=False, cancel_futures=True)
        log.info("http server stopped")
        loop.stop()
        log.info("engine loop stopped")
        if loop.failure:
            print(f"tpllama: rank failure: {loop.failure}", file=sys.stderr, flush=True)
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
