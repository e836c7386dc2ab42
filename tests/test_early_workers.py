"""Ranks 1..N-1 started before rank 0 imports torch (``parallel.early``): used when the
configuration needs them, stopped otherwise, never left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from tpllama.parallel.early import EarlyWorkers


def _workers_with_cache(cache: str) -> list[psutil.Process]:
    """Live worker processes started with TPLLAMA_CACHE=cache."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "tpllama.parallel.worker" in " ".join(p.info["cmdline"] or []) and \
                    p.environ().get("TPLLAMA_CACHE") == cache and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _gone_within(procs, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(p.poll() is not None for p in procs):
            return True
        time.sleep(0.05)
    return False


def test_bad_input_after_the_early_start_leaves_no_worker(tmp_path):
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    cache = str(tmp_path / "cache")
    r = subprocess.run([sys.executable, "-m", "tpllama", "generate", "--model", str(bad), "--world-size", "3",
                        "--prompt", "hi"], env=dict(os.environ, TPLLAMA_CACHE=cache), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "not a LLaMA-family checkpoint" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr  # the workers leave quietly
    deadline = time.monotonic() + 10
    while _workers_with_cache(cache) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _workers_with_cache(cache)


def test_workers_of_another_shape_are_stopped_and_unused_ones_closed():
    early = EarlyWorkers(3, 1)
    procs = list(early.procs)
    assert len(procs) == 2
    assert early.take(2, 1) is None  # the configuration turned out different: not used
    assert _gone_within(procs, 10)
    early.close()  # nothing left to close

    early = EarlyWorkers(2, 1)
    procs = list(early.procs)
    with early:
        pass
    assert _gone_within(procs, 10) and early.procs == []


def test_workers_that_fit_are_handed_over():
    early = EarlyWorkers(2, 1)
    procs = early.take(2, 1)
    try:
        assert procs is not None and len(procs) == 1 and procs[0].poll() is None
        early.close()  # after take: leaves the handed-over workers alone
        assert procs[0].poll() is None
    finally:
        for p in procs or []:
            p.kill()
            p.wait(timeout=10)


def test_a_worker_leaves_ctrl_c_to_rank_0():
    """SIGINT (a terminal's Ctrl-C reaches the whole process group) does not end a worker: rank 0
    decides; closing its stdin does."""
    early = EarlyWorkers(2, 1)
    procs = list(early.procs)
    try:
        time.sleep(3)  # past its first lines
        procs[0].send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert procs[0].poll() is None
    finally:
        early.close()
    assert _gone_within(procs, 10)
