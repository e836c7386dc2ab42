"""``tpllama bench --startup``: how long a user waits, from process start to tokens.

Each case runs the real command as a new process, as a user would: ``tpllama generate`` for 4
tokens at N = 1 and N = 2, from the GGUF file and from a cut directory, and ``tpllama serve`` at
N = 2 until ``/health`` answers. Reported per case: wall time to the first token of the answer on
stdout (or to healthy), to the end, and the peak resident memory of the whole process tree
(sampled every 20 ms). *Cold* runs start from an empty cache (the tokenizer converted, the model
cut; the C++ extensions and the downloaded default model are kept, since building and fetching
are one-time costs measured elsewhere); *warm* runs find everything cached. ``import torch`` alone
is measured in the same run: no tpllama start can be faster than that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPT = ["--prompt", "Hi", "--max-new-tokens", "4"]


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_case(argv: list[str], env: dict, until: str | None = None, timeout: float = 600) -> dict:
    """Run ``argv``; the time of the first byte on stdout (``until``: of the first line containing
    it), the end (or, with ``until``, a SIGINT right after it), and the peak RSS of the tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first: list[float] = []
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    if until is None:
        if proc.stdout.read(1):
            first.append(time.perf_counter() - t0)
        proc.stdout.read()
    else:
        for line in proc.stdout:
            if until.encode() in line:
                first.append(time.perf_counter() - t0)
                proc.send_signal(2)
                break
        proc.stdout.read()
    code = proc.wait(timeout=timeout)
    end = time.perf_counter() - t0
    sampler.join(1)
    return {"argv": argv[1:], "first_s": first[0] if first else None, "end_s": end, "peak_rss_bytes": peak[0],
            "exit_code": code}


def serve_until_healthy(argv: list[str], env: dict) -> dict:
    """``tpllama serve --port 0``: the time until ``/health`` answers 200, then SIGINT."""
    import json
    import urllib.request

    t0 = time.perf_counter()
    proc = subprocess.Popen(argv + ["--port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    peak = 0
    healthy = None
    for line in proc.stdout:
        peak = max(peak, _tree_rss(proc.pid))
        if line.startswith("serving "):
            url = line.split()[-1]
            while healthy is None and time.perf_counter() - t0 < 300:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5) as r:
                        if r.status == 200 and json.loads(r.read())["status"] == "ok":
                            healthy = time.perf_counter() - t0
                except OSError:
                    time.sleep(0.02)
            peak = max(peak, _tree_rss(proc.pid))
            proc.send_signal(2)
            break
    proc.stdout.read()
    code = proc.wait(timeout=60)
    return {"argv": argv[1:], "first_s": healthy, "end_s": time.perf_counter() - t0, "peak_rss_bytes": peak,
            "exit_code": code}


def measure(model: Path | None) -> list[dict]:
    """Every case, cold then warm (see the module docstring); rows for the table."""
    from ..env import cache_dir
    from ..weights.default_model import default_model_path

    real = cache_dir()
    gguf = Path(model) if model is not None else default_model_path()
    tpllama = [sys.executable, "-m", "tpllama"]
    rows = []
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    rows.append({"case": "python -c 'import torch' (the floor)", "cache": "", "first_s": None,
                 "end_s": time.perf_counter() - t0, "peak_rss_bytes": None, "exit_code": 0})
    with tempfile.TemporaryDirectory(prefix="tpllama-startup-") as tmp:
        cache = Path(tmp) / "cache"
        cache.mkdir()
        (cache / "ext").symlink_to(real / "ext")  # built once, elsewhere
        env = dict(os.environ, TPLLAMA_CACHE=str(cache))
        cut_dir = Path(tmp) / "cut-tp2"
        for temperature in ("cold", "warm"):
            if temperature == "cold":
                shutil.rmtree(cache / "tokenizers", ignore_errors=True)
                shutil.rmtree(cache / "parts", ignore_errors=True)
            cases = [
                ("generate, N = 1, GGUF file", tpllama + ["generate", "--model", str(gguf), *PROMPT], None),
                ("generate, N = 2, GGUF file (cut into the cache)",
                 tpllama + ["generate", "--model", str(gguf), "--world-size", "2", *PROMPT], None),
                ("serve, N = 2, until /health answers", tpllama + ["serve", "--model", str(gguf), "--world-size", "2"],
                 "serve"),
            ]
            if temperature == "warm":
                subprocess.run(tpllama + ["cut", "--input", str(gguf), "--output", str(cut_dir), "--world-size", "2",
                                          "--quant", "auto"], env=env, check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                cases.insert(2, ("generate, N = 2, cut directory",
                                 tpllama + ["generate", "--model", str(cut_dir), "--world-size", "2", *PROMPT], None))
            for label, argv, kind in cases:
                r = serve_until_healthy(argv, env) if kind == "serve" else run_case(argv, env)
                rows.append(dict(r, case=label, cache=temperature))
                print(f"  {label}, {temperature}: {_s(r['first_s'])} to the first token (or healthy), "
                      f"{_s(r['end_s'])} in all", file=sys.stderr, flush=True)
    return rows


def _s(x) -> str:
    return "-" if x is None else f"{x:.2f} s"


def table(rows: list[dict]) -> str:
    out = ["| case | cache | first token / healthy | whole run | peak RSS (process tree) |",
           "|:--|:--|--:|--:|--:|"]
    for r in rows:
        rss = "-" if not r["peak_rss_bytes"] else f"{r['peak_rss_bytes'] / 1e9:.2f} GB"
        out.append(f"| {r['case']} | {r['cache']} | {_s(r['first_s'])} | {_s(r['end_s'])} | {rss} |")
    return "\n".join(out)
