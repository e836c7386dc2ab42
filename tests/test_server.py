"""``tpllama serve``: a real server subprocess (2 ranks) on a tiny random LLaMA with SmolLM2's
tokenizer, driven with the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import httpx
import openai
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from helpers import make_fresh_cache, make_tiny_hf  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 4096  # the tiny model's max_position_embeddings
START_TIMEOUT = 120


# ---------------------------------------------------------------------- fixtures
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, cache: Path, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, TPLLAMA_CACHE=str(cache), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "tpllama", "serve", "--model", str(model), "--world-size", "2",
               "--port", str(self.port), "--threads", "1", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError("server did not start in time:\n" + "".join(self.log))
            if line is None:
                raise RuntimeError(f"server exited with {self.proc.wait()}:\n" + "".join(self.log))
            if line.startswith("serving "):
                assert f"http://127.0.0.1:{self.port}" in line
                self.name = line.split()[1]
                break

    def _read(self):
        for line in self.proc.stdout:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def tree(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self):
        kids = self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for k in kids:
            try:
                k.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny random LLaMA with SmolLM2's vocabulary, tokenizer and chat template."""
    from tpllama.env import cache_dir
    from tpllama.weights.default_model import default_model_path
    from tpllama.weights.tokenizer import gguf_tokenizer_dir

    d = make_tiny_hf(tmp_path_factory.mktemp("srv") / "tiny-chat", "smol-like", seed=3, vocab_size=49152,
                     max_position_embeddings=CONTEXT)
    tdir = gguf_tokenizer_dir(default_model_path(), cache_dir())
    assert tdir is not None
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tdir / name).is_file():
            shutil.copy2(tdir / name, d / name)
    return d


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    s = Server(chat_model, make_fresh_cache(tmp_path_factory.mktemp("srv") / "cache"), "--api-key", KEY, "--max-batch", "4", "--max-queue", "4")
    yield s
    s.stop()
    assert s.proc.returncode == 0, "".join(s.log[-30:])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def metric(http, name: str) -> float:
    text = http.get("/metrics").text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def wait_idle(http, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(http, "tpllama_requests_running") == 0 and metric(http, "tpllama_requests_waiting") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("requests still running after the timeout")


def greedy(client, server, prompt="The quick brown fox", n=24) -> str:
    r = client.completions.create(model=server.name, prompt=prompt, max_tokens=n, temperature=0)
    return r.choices[0].text


# ---------------------------------------------------------------------- basics
def test_health_models_metrics(server, client, http):
    h = httpx.get(server.url + "/health", timeout=10)  # open without a key
    assert h.status_code == 200 and h.json()["status"] == "ok"
    models = client.models.list()
    assert [m.id for m in models.data] == [server.name]
    text = http.get("/metrics").text
    for name in ("tpllama_http_requests_total", "tpllama_prompt_tokens_total", "tpllama_generation_tokens_total",
                 "tpllama_requests_waiting", "tpllama_requests_running", "tpllama_time_to_first_token_seconds_bucket",
                 "tpllama_time_per_output_token_seconds_count"):
        assert name in text


def test_api_key(server):
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(server.url + path, timeout=10).status_code == 401
        assert httpx.get(server.url + path, headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
    r = httpx.post(server.url + "/v1/completions", json={"model": server.name, "prompt": "hi"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_completion_stream_equals_non_stream(server, client):
    r = client.completions.create(model=server.name, prompt="Once upon a time", max_tokens=20, temperature=0)
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.completions.create(model=server.name, prompt="Once upon a time", max_tokens=20,
                                            temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    assert chunks[-1].choices[0].finish_reason == c.finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_chat_stream_equals_non_stream(server, client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=server.name, messages=msgs, max_tokens=24, temperature=0)
    assert r.choices[0].message.role == "assistant"
    text = r.choices[0].message.content
    assert r.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model=server.name, messages=msgs, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason


def test_token_id_prompt(server, client, http):
    r = http.post("/v1/completions", json={"model": server.name, "prompt": [5, 17, 900, 40000], "max_tokens": 6,
                                           "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["prompt_tokens"] == 4 and len(body["choices"][0]["token_ids"]) == body["usage"]["completion_tokens"]
    r2 = client.completions.create(model=server.name, prompt=[[5, 17, 900, 40000]], max_tokens=6, temperature=0)
    assert r2.choices[0].text == body["choices"][0]["text"]


def test_stop_string(server, client):
    full = greedy(client, server, n=40)
    assert len(full) > 12
    stop = full[8:11]
    expect = full[: full.find(stop)]
    r = client.completions.create(model=server.name, prompt="The quick brown fox", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == expect and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=server.name, prompt="The quick brown fox", max_tokens=40,
                                            temperature=0, stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expect


def test_logprobs(server, client, http):
    r = client.completions.create(model=server.name, prompt="Hello", max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) >= 1
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(abs(max(t.values()) - v) < 1e-5 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    c = client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert content and all(len(e.top_logprobs) == 2 for e in content)
    assert http.post("/v1/completions", json={"model": server.name, "prompt": "x", "logprobs": 6}).status_code == 400


def test_sampling_seed(server, client):
    kw = dict(model=server.name, prompt="Tell me", max_tokens=12, temperature=1.0, top_p=0.9, seed=1234,
              frequency_penalty=0.5, presence_penalty=0.3, extra_body={"repetition_penalty": 1.1, "top_k": 50})
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


# ---------------------------------------------------------------------- continuous batching
PROMPTS = ["The quick brown fox", "Hello", "In a galaxy far, far away, there was", "1 2 3 4",
           "Once upon a time", "What is the capital of France?", "def main():", "Roses are red,"]


def test_concurrent_clients_match_alone(server, client):
    alone = [greedy(client, server, p, 32) for p in PROMPTS]

    def one(i: int) -> str:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        if i % 2:
            chunks = c.completions.create(model=server.name, prompt=PROMPTS[i], max_tokens=32, temperature=0, stream=True)
            return "".join(ch.choices[0].text for ch in chunks if ch.choices)
        return c.completions.create(model=server.name, prompt=PROMPTS[i], max_tokens=32, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, range(8)))
    assert together == alone


def _open_long_stream(http, server, n=CONTEXT - 16):
    req = http.build_request("POST", "/v1/completions", json={
        "model": server.name, "prompt": [7, 8, 9], "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True})
    return http.send(req, stream=True)


def test_disconnect_frees_slot(server, http):
    wait_idle(http)
    aborted = metric(http, "tpllama_requests_aborted_total")
    resp = _open_long_stream(http, server)
    assert resp.status_code == 200
    lines = resp.iter_lines()
    got = 0
    for line in lines:
        if line.startswith("data: {"):
            got += 1
            if got == 3:
                break
    assert metric(http, "tpllama_requests_running") == 1
    resp.close()
    wait_idle(http, timeout=10)
    assert metric(http, "tpllama_requests_aborted_total") == aborted + 1
    # a non-streaming client that gives up is noticed too
    with pytest.raises(httpx.TimeoutException):
        http.post("/v1/completions", timeout=1.0, json={"model": server.name, "prompt": [7, 8, 9],
                                                        "max_tokens": CONTEXT - 16, "ignore_eos": True})
    wait_idle(http, timeout=10)
    assert metric(http, "tpllama_requests_aborted_total") == aborted + 2


def test_queue_full_429(server, http):
    wait_idle(http)
    streams = []
    try:
        for _ in range(8):  # 4 slots + 4 queued
            streams.append(_open_long_stream(http, server))
            assert streams[-1].status_code == 200
        over = http.post("/v1/completions", json={"model": server.name, "prompt": "x", "max_tokens": 2})
        assert over.status_code == 429
        assert over.json()["error"]["type"] == "rate_limit_error"
        deadline = time.monotonic() + 10  # the scheduler admits queued requests between decode steps
        while (metric(http, "tpllama_requests_running"), metric(http, "tpllama_requests_waiting")) != (4, 4):
            assert time.monotonic() < deadline, "expected 4 running and 4 waiting"
            time.sleep(0.05)
    finally:
        for s in streams:
            s.close()
    wait_idle(http, timeout=15)


# ---------------------------------------------------------------------- validation
def _body(server, **kw):
    return dict({"model": server.name, "prompt": "hello", "max_tokens": 4}, **kw)


BAD_COMPLETIONS = [
    {"temperature": -1}, {"temperature": 101}, {"temperature": "0.5"}, {"temperature": True}, {"temperature": 1e999},
    {"top_p": 0}, {"top_p": 1.5}, {"top_p": -0.1}, {"top_k": -2}, {"top_k": 1.5}, {"top_k": "5"},
    {"repetition_penalty": 0}, {"repetition_penalty": -1}, {"repetition_penalty": 1e-300},
    {"frequency_penalty": 2.5}, {"presence_penalty": -3}, {"frequency_penalty": None, "presence_penalty": [1]},
    {"max_tokens": 0}, {"max_tokens": -1}, {"max_tokens": 10**30}, {"max_tokens": 2**31}, {"max_tokens": 1.5},
    {"max_tokens": "4"}, {"n": 2}, {"n": 0}, {"best_of": 3}, {"logprobs": 6}, {"logprobs": -1}, {"seed": -1},
    {"seed": 2**64}, {"seed": "1"}, {"stop": 5}, {"stop": ["a", 1]}, {"stop": ["a", "b", "c", "d", "e"]},
    {"prompt": ""}, {"prompt": []}, {"prompt": [-1]}, {"prompt": [49152]}, {"prompt": [2**63]}, {"prompt": [1.5]},
    {"prompt": ["a", "b"]}, {"prompt": None}, {"prompt": {"a": 1}}, {"stream": "yes"}, {"model": 5},
    {"logit_bias": {"5": 10}}, {"echo": True, "logprobs": 1},
]


@pytest.mark.parametrize("extra", BAD_COMPLETIONS, ids=lambda e: json.dumps(e)[:60])
def test_bad_completion_params(server, http, extra):
    r = http.post("/v1/completions", content=json.dumps(_body(server, **extra)), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"] and "param" in err and "code" in err


BAD_CHATS = [
    {"messages": []}, {"messages": "hi"}, {"messages": [{"content": "hi"}]}, {"messages": [{"role": "robot", "content": "x"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "user", "content": 5}]}, {"logprobs": True, "top_logprobs": 9}, {"top_logprobs": 2},
    {"messages": [{"role": "user"}]}, {"messages": [{"role": "user", "content": None}]},
    {"messages": [{"role": "user", "content": []}]}, {"stop": [""]},
    {"n": 3}, {"temperature": -0.5}, {"max_completion_tokens": 0}, {"tools": [{"type": "function"}]},
    {"response_format": {"type": "json_object"}},
]


@pytest.mark.parametrize("extra", BAD_CHATS, ids=lambda e: json.dumps(e)[:60])
def test_bad_chat_params(server, http, extra):
    body = dict({"model": server.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, **extra)
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def _error(r) -> dict:
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_lone_surrogates_are_400_naming_the_field(server, http):
    h = {"Content-Type": "application/json"}
    name = server.name
    cases = [
        ('{"model": "%s", "prompt": "hi \\ud800", "max_tokens": 2}' % name, "/v1/completions", "prompt"),
        ('{"model": "\\ud800", "prompt": "hi", "max_tokens": 2}', "/v1/completions", "model"),
        ('{"model": "%s", "prompt": ["\\udfff"], "max_tokens": 2}' % name, "/v1/completions", "prompt.0"),
        ('{"model": "%s", "messages": [{"role": "user", "content": "a\\udc00b"}], "max_tokens": 2}' % name,
         "/v1/chat/completions", "messages.0.content"),
        ('{"model": "%s", "prompt": "x", "stop": ["\\ud83d"], "max_tokens": 2}' % name, "/v1/completions", "stop.0"),
    ]
    for body, url, param in cases:
        assert "\\u" in body
        err = _error(http.post(url, content=body.encode(), headers=h))
        assert err["param"] == param and "surrogate" in err["message"], (body, err)
    # a proper pair is text: accepted
    ok = '{"model": "%s", "prompt": "hi \\ud83d\\ude00", "max_tokens": 2}' % name
    assert http.post("/v1/completions", content=ok.encode(), headers=h).status_code == 200


def test_messages_without_content_and_empty_stop_strings(server, http):
    chat = {"model": server.name, "max_tokens": 2}
    for message in ({"role": "user"}, {"role": "user", "content": None}, {"role": "user", "content": []},
                    {"role": "system"}):
        body = dict(chat, messages=[message] if message["role"] == "user" else [message, {"role": "user", "content": "x"}])
        err = _error(http.post("/v1/chat/completions", json=body))
        assert err["param"] == "messages.0.content" and "required" in err["message"], err
    assert http.post("/v1/chat/completions", json=dict(chat, messages=[{"role": "user", "content": ""}])).status_code == 200
    for stop in ("", [""], ["a", ""]):
        err = _error(http.post("/v1/completions", json=_body(server, stop=stop)))
        assert err["param"] == "stop" and "non-empty" in err["message"], err
    assert http.post("/v1/completions", json=_body(server, stop=[])).status_code == 200


HEALTH_PROBE = """
import sys, threading, time, httpx
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
worst, deadline = 0.0, time.monotonic() + 60
print("started", flush=True)
with httpx.Client(timeout=10) as c:
    while not stop.is_set() and time.monotonic() < deadline:
        t0 = time.perf_counter()
        assert c.get(sys.argv[1]).status_code == 200
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.02)
print(worst, flush=True)
"""


def test_huge_prompts_do_not_stall_the_server(server, http):
    """Four 4 MB prompts are refused by length before tokenizing, prompts just short enough to be
    tokenized are tokenized off the event loop: /health keeps answering in < 0.5 s throughout."""
    huge = "hello world " * (4_000_000 // 12)
    tokenized = "hello world " * 25_000  # 300 000 characters: passes the length check, then too many tokens
    results: list = []

    def post(prompt, url="/v1/completions"):
        if url == "/v1/completions":
            body = _body(server, prompt=prompt)
        else:
            body = {"model": server.name, "max_tokens": 2, "messages": [{"role": "user", "content": prompt}]}
        results.append(http.post(url, content=json.dumps(body), headers={"Content-Type": "application/json"}))

    threads = [threading.Thread(target=post, args=(p, u)) for p in (huge, tokenized)
               for u in ("/v1/completions", "/v1/chat/completions") for _ in range(2)]
    # /health is timed from a process of its own: the 8 posting threads of this one (4 MB json.dumps
    # each) would otherwise delay the probe in the client, not in the server
    probe = subprocess.Popen([sys.executable, "-c", HEALTH_PROBE, server.url + "/health"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert probe.stdout.readline().strip() == "started"
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    out, _ = probe.communicate("stop\n", timeout=30)
    worst = float(out.split()[-1])
    assert len(results) == 8
    for r in results:
        err = _error(r)
        assert err["code"] == "context_length_exceeded", err
    assert sum("characters" in r.json()["error"]["message"] for r in results) == 4  # refused before tokenizing
    assert worst < 0.5, f"/health took {worst:.2f} s while long prompts were being refused"


def test_every_listening_socket_is_on_the_loopback(server):
    """The HTTP socket, the ranks' rendezvous store and gloo's sockets: 127.0.0.1 only (--host default)."""
    listening = []
    for p in [psutil.Process(server.proc.pid), *server.tree()]:
        listening += [(p.pid, c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert len(listening) >= 3, listening  # http + store + gloo at least
    assert all(ip == "127.0.0.1" for _, ip, _ in listening), listening


def test_bad_requests_raw(server, http, client):
    before = greedy(client, server)
    url = "/v1/completions"
    h = {"Content-Type": "application/json"}
    cases = [
        (b'{"model": "%s", "prompt": "x", "temperature": NaN}' % server.name.encode(), h, 400),
        (b'{"model": "%s", "prompt": "x", "top_p": Infinity}' % server.name.encode(), h, 400),
        (b"{not json", h, 400),
        (b"", h, 400),
        (b"[]", h, 400),
        (b"null", h, 400),
        (b"[" * 100000 + b"]" * 100000, h, 400),
        (b'{"model": "x"}', {"Content-Type": "text/plain"}, 415),
        (b"x" * (5 << 20), h, 413),
    ]
    for data, headers, status in cases:
        r = http.post(url, content=data, headers=headers)
        assert r.status_code == status, (data[:80], r.status_code, r.text[:300])
        assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
    # a chunked (no Content-Length) oversized body
    r = http.post(url, content=iter([b"y" * (1 << 20)] * 5), headers=h)
    assert r.status_code == 413
    # too long a prompt: the message names both numbers
    r = http.post(url, json=_body(server, prompt=[5] * (CONTEXT + 10)))
    assert r.status_code == 400 and str(CONTEXT + 10) in r.text and str(CONTEXT) in r.json()["error"]["message"]
    r = http.post(url, json=_body(server, prompt=[5] * (CONTEXT - 50), max_tokens=100))
    assert r.status_code == 400 and str(CONTEXT - 50) in r.text and str(CONTEXT) in r.text
    # unknown model: 404; unknown route: 404 in the envelope; wrong method: 405
    r = http.post(url, json=_body(server, model="gpt-nope"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert http.get("/v1/nothing").json()["error"]["message"]
    assert http.get(url).status_code == 405
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=server.name, prompt="x", n=2, max_tokens=2)
    assert greedy(client, server) == before
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_fuzz_no_5xx(server, http, client):
    """schemathesis over /openapi.json when available (plus random JSON bodies): never a 5xx."""
    before = greedy(client, server)
    rng = random.Random(0)
    values = [None, True, False, 0, -1, 1, 2**70, -(2**70), 0.5, -1e308, 1e308, "", "x", "\u0000", [], [1], [-5],
              {}, {"a": 1}, [[1, 2]], ["a"], float("nan")]
    keys = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream",
            "logprobs", "top_logprobs", "echo", "repetition_penalty", "frequency_penalty", "presence_penalty",
            "max_completion_tokens", "stream_options", "ignore_eos", "response_format"]
    for i in range(120):
        body = {k: rng.choice(values) for k in rng.sample(keys, rng.randint(0, 8))}
        if rng.random() < 0.5:
            body["model"] = server.name
        if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool) and body["max_tokens"] > 8:
            body["max_tokens"] = 8
        body.setdefault("max_tokens", 4)
        if rng.random() < 0.3:
            body["messages"] = [{"role": rng.choice(["user", "system", "x", 5]), "content": rng.choice(values)}]
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        data = json.dumps(body, allow_nan=True)
        r = http.post(path, content=data, headers={"Content-Type": "application/json"})
        assert r.status_code < 500, (path, data, r.status_code, r.text[:300])

    try:
        import schemathesis
        from hypothesis import HealthCheck, given, settings
    except ImportError:
        schemathesis = None
    if schemathesis is not None:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=AUTH)
        failures, calls = [], []
        for result in schema.get_all_operations():
            op = result.ok()

            @settings(max_examples=25, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy())
            def run(case):
                if isinstance(case.body, dict):
                    mt = case.body.get("max_tokens")
                    if not (isinstance(mt, int) and not isinstance(mt, bool) and mt <= 8):
                        case.body["max_tokens"] = 4
                    case.body.pop("max_completion_tokens", None)
                r = case.call(base_url=server.url, headers=AUTH, timeout=30)
                calls.append(r.status_code)
                if r.status_code >= 500:
                    failures.append((op.label, case.body, r.status_code, r.text[:300]))

            run()
        assert not failures, failures[:3]
        assert len(calls) >= 50, len(calls)
    wait_idle(http)
    assert greedy(client, server) == before


# ---------------------------------------------------------------------- packages
BLOCKED_IMPORT = """
import sys
sys.modules[sys.argv[1]] = None  # as if the package were not installed
from tpllama.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("package", ["fastapi", "uvicorn"])
def test_missing_server_package_is_named(package, tmp_path):
    proc = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT, package, "serve", "--world-size", "2",
                           "--model", str(tmp_path / "never-loaded")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"needs the Python package `{package}`" in proc.stderr and "pip install" in proc.stderr, proc.stderr
    assert "unrecognized arguments" not in proc.stderr


def test_server_packages_are_base_dependencies():
    from importlib.metadata import requires

    names = {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in requires("tpllama") if "extra ==" not in r}
    assert {"fastapi", "uvicorn"} <= names, names


# ---------------------------------------------------------------------- rank failure
def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_rank_death(chat_model, tmp_path_factory):
    s = Server(chat_model, make_fresh_cache(tmp_path_factory.mktemp("srv2") / "cache"), "--timeout", "10")
    try:
        tree = s.tree()
        workers = [p for p in tree if "tpllama.parallel.worker" in " ".join(p.cmdline())]
        assert len(workers) == 1, [p.cmdline() for p in tree]
        # a request in flight when the rank dies gets an error
        got: list[str] = []

        def long_request():
            try:
                with httpx.stream("POST", s.url + "/v1/completions", timeout=30, json={
                        "model": s.name, "prompt": [5, 6], "max_tokens": CONTEXT - 8, "ignore_eos": True, "stream": True}) as r:
                    for line in r.iter_lines():
                        got.append(line)
            except httpx.HTTPError as err:
                got.append(f"client error {err!r}")

        t = threading.Thread(target=long_request, daemon=True)
        t.start()
        deadline = time.monotonic() + 10
        while not any(g.startswith("data: {") for g in got) and time.monotonic() < deadline:
            time.sleep(0.05)
        workers[0].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        status = None
        while time.monotonic() - t0 < 10:
            try:
                status = httpx.get(s.url + "/health", timeout=2).status_code
            except httpx.HTTPError:
                status = None
            if status == 503:
                break
            time.sleep(0.05)
        assert status == 503
        code = s.proc.wait(timeout=30)
        assert code != 0, "".join(s.log[-20:])
        t.join(timeout=15)
        assert not t.is_alive()
        assert any('"error"' in g or "client error" in g for g in got), got[-6:]
        assert "rank failure" in "".join(s.log)
        deadline = time.monotonic() + 10
        alive = tree
        while alive and time.monotonic() < deadline:
            alive = [p for p in tree if _alive(p)]
            time.sleep(0.1)
        assert not alive, f"orphans: {[p.cmdline() for p in alive]}"
    finally:
        s.stop()
