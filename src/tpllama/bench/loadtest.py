"""A small load test for ``tpllama serve`` (standard library only).

    python -m tpllama.bench.loadtest --url http://127.0.0.1:8000 --concurrency 1 4 8

For each concurrency level C, C client threads send streaming chat completions back to back
(greedy, ``max_tokens`` each, EOS ignored so every answer has the same length) until
``--requests`` have completed; prints requests/s, output tokens/s and time to first token
(p50/p90) and time per output token (p50) per level.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in one paragraph.", "Write a haiku about the sea.",
    "List three uses of copper.", "Why is the sky blue?", "Give me a recipe for pancakes.",
    "What is a prime number?", "Summarize the plot of Hamlet.",
]


def one_request(url: str, headers: dict, body: dict) -> tuple[float, float, int]:
    """(time to first token, total time, completion tokens) of one streaming request."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=300)
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    finally:
        conn.close()
    total = time.perf_counter() - t0
    return (ttft if ttft is not None else total), total, tokens


def run_level(url: str, headers: dict, model: str, concurrency: int, n_requests: int, max_tokens: int) -> dict:
    results: list[tuple[float, float, int]] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(n_requests))

    def client(cid: int):
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
            try:
                r = one_request(url, headers, body)
                with lock:
                    results.append(r)
            except Exception as err:  # report, keep going
                with lock:
                    errors.append(str(err))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    tpots = sorted((r[1] - r[0]) / max(1, r[2] - 1) for r in results)
    out_tokens = sum(r[2] for r in results)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"concurrency": concurrency, "requests": len(results), "errors": len(errors), "wall_s": wall,
            "req_per_s": len(results) / wall, "out_tok_per_s": out_tokens / wall,
            "ttft_p50_ms": 1000 * pct(ttfts, 0.5), "ttft_p90_ms": 1000 * pct(ttfts, 0.9),
            "tpot_p50_ms": 1000 * (statistics.median(tpots) if tpots else float("nan")),
            "first_error": errors[0] if errors else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpllama.bench.loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="model id (default: the server's first)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: 4 x concurrency, at least 8)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print one JSON object per level")
    a = p.parse_args(argv)
    headers = {"Content-Type": "application/json"}
    if a.api_key:
        headers["Authorization"] = f"Bearer {a.api_key}"
    model = a.model
    if model is None:
        u = urllib.parse.urlsplit(a.url)
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=30)
        conn.request("GET", "/v1/models", headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            print(f"GET /v1/models: HTTP {resp.status}", file=sys.stderr)
            return 1
        model = json.loads(resp.read())["data"][0]["id"]
    one_request(a.url, headers, {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                 "temperature": 0, "stream": True})  # warm-up
    if not a.json:
        print(f"model {model}, max_tokens {a.max_tokens}, streaming chat completions, greedy, EOS ignored")
        print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p90':>9} {'TPOT p50':>9}")
    for c in a.concurrency:
        n = a.requests or max(8, 4 * c)
        r = run_level(a.url, headers, model, c, n, a.max_tokens)
        if a.json:
            print(json.dumps(r))
        else:
            print(f"{c:>7} {r['requests']:>8} {r['req_per_s']:>7.2f} {r['out_tok_per_s']:>7.1f} "
                  f"{r['ttft_p50_ms']:>7.0f}ms {r['ttft_p90_ms']:>7.0f}ms {r['tpot_p50_ms']:>7.1f}ms"
                  + (f"  ({r['errors']} errors: {r['first_error']})" if r["errors"] else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
