"""Tensor parallelism: cut, N ranks, identical greedy output for every N, failures."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open

import tpllama
from tpllama.weights.checkpoint import CheckpointError, open_checkpoint
from tpllama.weights.parts import cut
from tpllama.parallel.plan import ShardError, plan, split_rule

LOGIT_TOL = 1e-4


def logits_and_greedy(engine, ids: torch.Tensor, new: int = 24):
    engine.runner.ensure_cache(1, 256)
    logits = engine.runner.forward(ids, torch.arange(ids.shape[1])[None], slice(0, 1))[:, -1]
    out = engine.generate(ids, max_new_tokens=new, ignore_eos=True)
    return logits, out


@pytest.mark.parametrize("name,sizes", [("smol-like", (1, 2, 3)), ("gqa6", (1, 2, 3)), ("mha4-llama3", (1, 3))])
def test_every_world_size_gives_the_same_tokens(tiny_dirs, tmp_path, name, sizes):
    ids = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(5))
    results = {}
    for n in sizes:
        src = tiny_dirs[name] if n == 1 else cut(tiny_dirs[name], tmp_path / f"tp{n}", n, progress=False)
        with tpllama.load(src, world_size=n) as engine:
            results[n] = logits_and_greedy(engine, ids)
    for n in sizes[1:]:
        assert (results[n][0] - results[1][0]).abs().max().item() <= LOGIT_TOL
        assert torch.equal(results[n][1], results[1][1])


def test_smollm2_same_tokens_for_1_2_3_ranks(smol_gguf, tmp_path):
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]])
    results = {}
    for n in (1, 2, 3):
        src = smol_gguf if n == 1 else cut(smol_gguf, tmp_path / f"tp{n}", n, progress=False)
        with tpllama.load(src, world_size=n) as engine:
            results[n] = logits_and_greedy(engine, ids, new=32)
            if n > 1:
                assert engine.tokenizer is not None  # tokenizer files travel with the parts
    for n in (2, 3):
        assert (results[n][0] - results[1][0]).abs().max().item() <= LOGIT_TOL
        assert torch.equal(results[n][1], results[1][1])


def test_uneven_split_follows_kv_groups():
    from tpllama.config import ModelArgs

    args = ModelArgs(dim=576, n_layers=1, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_dim=1536, head_dim=64)
    shares = plan(args, 2)
    # the extra KV group goes to the last rank (rank 0 also drives generation) ...
    assert [s.n_kv_heads for s in shares] == [1, 2] and [s.n_heads for s in shares] == [3, 6]
    # ... and the FFN (in 32-blocks) is split evenly on its own: every all-reduce is a barrier, so
    # extra FFN columns on rank 0 would not make up for its fewer heads
    assert [s.ffn for s in shares] == [(0, 768), (768, 1536)]
    assert shares[1].vocab == (24576, 49152)
    even = ModelArgs(dim=576, n_layers=1, n_heads=8, n_kv_heads=4, vocab_size=100, ffn_dim=1536, head_dim=64)
    assert [s.ffn for s in plan(even, 2)] == [(0, 768), (768, 1536)]  # even heads: even FFN
    with pytest.raises(ShardError, match="world size 10 is larger than the model's 9 query heads"):
        plan(args, 10)


def merge_parts(directory: Path) -> dict[str, torch.Tensor]:
    """Test helper: the inverse of cut (concatenate split tensors, take replicated ones from rank 0)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    parts = []
    for r in range(manifest["world_size"]):
        with safe_open(str(directory / "part_model" / str(r) / "model.safetensors"), "pt") as fh:
            parts.append({k: fh.get_tensor(k) for k in fh.keys()})
    shares = [r["share"] for r in manifest["ranks"]]
    merged = {}
    for name in parts[0]:
        rule = split_rule(name)
        if rule is None:
            merged[name] = parts[0][name]
            continue
        dim, which = rule
        seen, pieces = set(), []
        for share, p in zip(shares, parts):  # KV heads held by several ranks (copies): once
            key = tuple(share[which])
            if key not in seen:
                seen.add(key)
                pieces.append(p[name])
        merged[name] = torch.cat(pieces, dim=dim)
    return merged


def test_cut_then_merge_is_bit_exact(tiny_dirs, tmp_path):
    src = tiny_dirs["smol-like"]
    out = cut(src, tmp_path / "parts", 3, progress=False)
    merged = merge_parts(out)
    ckpt = open_checkpoint(src)
    for name in ckpt.names():
        assert torch.equal(merged[name], ckpt.read(name)), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 3 and len(manifest["ranks"]) == 3
    assert [r["share"]["kv_heads"] for r in manifest["ranks"]] == [[0, 1], [1, 2], [2, 3]]
    assert all(len(digest) == 64 for r in manifest["ranks"] for digest in r["files"].values())


def test_flipped_byte_is_caught_and_wrong_world_size_refused(tiny_dirs, tmp_path):
    out = cut(tiny_dirs["gqa6"], tmp_path / "parts", 2, progress=False)
    with pytest.raises(CheckpointError, match="cut for world size 2, but world size 3 was asked for"):
        tpllama.load(out, world_size=3)
    f = out / "part_model" / "1" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-7] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="part_model/1/model.safetensors is corrupt: sha256"):
        tpllama.load(out, world_size=2)


@pytest.mark.parametrize("damage", ["world size 2 -> 3", "part directory removed", "rank entry renumbered"])
def test_damaged_manifest_is_bad_input_before_any_rank_starts(tiny_dirs, tmp_path, damage, monkeypatch):
    out = cut(tiny_dirs["gqa6"], tmp_path / "parts", 2, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    world_size = 2
    if damage == "world size 2 -> 3":
        manifest["world_size"] = world_size = 3
        expect = "says world size 3 but lists 2 rank(s)"
    elif damage == "part directory removed":
        import shutil

        shutil.rmtree(out / "part_model" / "1")
        expect = "holds part(s) 0"
    else:
        manifest["ranks"][1]["share"]["rank"] = 0
        expect = "entry 1 of its ranks is rank 0 of 2"
    (out / "manifest.json").write_text(json.dumps(manifest))
    started = []
    monkeypatch.setattr("tpllama.parallel.launch.Workers", lambda *a, **k: started.append(a))
    with pytest.raises(CheckpointError, match=re.escape(expect)):
        tpllama.load(out, world_size=world_size)
    assert started == []  # refused before any rank started
    proc = subprocess.run([sys.executable, "-m", "tpllama", "run", "--model", str(out), "--world-size", str(world_size),
                           "--no-perf"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr  # bad input, not a rank failure (1)
    assert expect in proc.stderr and "rank failure" not in proc.stderr and "IndexError" not in proc.stderr


SLOW_CUT = textwrap.dedent("""
    import sys, time
    import tpllama.weights.parts as cutmod
    real = cutmod.SafetensorsStreamWriter.write
    def slow_write(self, name, tensor):
        real(self, name, tensor)
        print("writing", flush=True)
        time.sleep(0.5)
    cutmod.SafetensorsStreamWriter.write = slow_write
    cutmod.cut(sys.argv[1], sys.argv[2], 2, progress=False)
""")


def _start_slow_cut(src: Path, target: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CUT, str(src), str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def _temporaries(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.tmp-*"))


def test_killed_cut_leaves_temporaries_that_the_next_cut_removes(tiny_dirs, tmp_path):
    target = tmp_path / "parts"
    left = []
    for _ in range(2):  # two cuts killed with SIGKILL: each leaves its temporary directory behind ...
        proc = _start_slow_cut(tiny_dirs["gqa6"], target)
        proc.kill()
        proc.wait()
        left.append(_temporaries(target))
    assert len(left[0]) == 1 and len(left[1]) == 1 and left[0] != left[1]  # ... the second removed the first's
    cut(tiny_dirs["gqa6"], target, 2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]  # stale temporaries and the lock file gone
    with tpllama.load(target, world_size=2) as engine:
        assert engine.generate([[5, 6, 7]], max_new_tokens=2).shape == (1, 5)


def test_a_running_cut_keeps_its_temporary_and_a_second_cut_waits(tiny_dirs, tmp_path):
    target = tmp_path / "parts"
    first = _start_slow_cut(tiny_dirs["gqa6"], target)
    mine = _temporaries(target)
    assert len(mine) == 1
    result: dict = {}
    second = threading.Thread(target=lambda: result.update(out=cut(tiny_dirs["gqa6"], target, 2, progress=False)))
    second.start()
    time.sleep(1.5)
    assert second.is_alive() and mine[0].is_dir()  # the second waits for the lock; it did not touch the live one
    first.kill()  # now that temporary is stale: the waiting cut removes it and finishes
    first.wait()
    second.join(60)
    assert result["out"] == target and not mine[0].exists() and _temporaries(target) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts"]


def test_cache_cut_removes_stale_temporaries(tiny_dirs, fresh_cache, monkeypatch):
    from tpllama.weights.source import resolve_parts

    monkeypatch.setenv("TPLLAMA_CACHE", str(fresh_cache))
    first = resolve_parts(tiny_dirs["gqa6"], 2, torch.float32, None, progress=False)
    import shutil

    shutil.rmtree(first)  # as if it had never finished; a killed cut left this beside it:
    stale = first.parent / f".{first.name}.tmp-killed"
    (stale / "part_model" / "0").mkdir(parents=True)
    again = resolve_parts(tiny_dirs["gqa6"], 2, torch.float32, None, progress=False)
    assert again == first and (first / "manifest.json").is_file() and not stale.exists()
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]


def test_interrupted_cut_leaves_nothing_loadable_and_rerun_works(tiny_dirs, tmp_path, monkeypatch):
    import tpllama.weights.parts as cutmod

    target = tmp_path / "parts"
    calls = {"n": 0}
    real = cutmod.SafetensorsStreamWriter.write

    def dying_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt("simulated interruption")
        return real(self, name, tensor)

    monkeypatch.setattr(cutmod.SafetensorsStreamWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        cut(tiny_dirs["gqa6"], target, 2, progress=False)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError):
        tpllama.load(target, world_size=2)
    monkeypatch.setattr(cutmod.SafetensorsStreamWriter, "write", real)
    cut(tiny_dirs["gqa6"], target, 2, progress=False)
    with tpllama.load(target, world_size=2) as engine:
        assert engine.generate([[5, 6, 7]], max_new_tokens=3).shape == (1, 6)


def test_uncut_checkpoint_is_cut_into_the_cache_once(tiny_dirs, tmp_path, fresh_cache, monkeypatch):
    monkeypatch.setenv("TPLLAMA_CACHE", str(fresh_cache))
    with tpllama.load(tiny_dirs["gqa6"], world_size=3) as engine:
        first = engine.generate([[5, 6, 7]], max_new_tokens=5)
        parts = Path(engine.info["parts"])
    assert parts.parent == tmp_path / "cache" / "parts" and (parts / "manifest.json").is_file()
    mtime = (parts / "manifest.json").stat().st_mtime_ns
    with tpllama.load(tiny_dirs["gqa6"], world_size=3) as engine:
        assert torch.equal(engine.generate([[5, 6, 7]], max_new_tokens=5), first)
    assert (parts / "manifest.json").stat().st_mtime_ns == mtime


RUNNER = textwrap.dedent("""
    import sys, torch, tpllama
    engine = tpllama.load(sys.argv[1], world_size=2, timeout_s=float(sys.argv[2]))
    print("ready", flush=True)
    try:
        while True:
            engine.generate([[5, 6, 7]], max_new_tokens=200, ignore_eos=True)
    except tpllama.RankFailure as err:
        print("rank failure:", err, flush=True)
        engine.close()
        sys.exit(3)
""")


def start_runner(model_dir: Path, timeout_s: float):
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(model_dir), str(timeout_s)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    line = ""
    while time.monotonic() < deadline and "ready" not in line:
        line = proc.stdout.readline()
    assert "ready" in line, line
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) == 1
    time.sleep(0.5)  # mid-generation
    return proc, workers[0]


def assert_all_gone(procs, within_s: float):
    gone, alive = psutil.wait_procs(procs, timeout=within_s)
    for p in alive:
        p.kill()
    assert not alive, f"still running: {alive}"


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_dead_or_stuck_rank_ends_every_rank(tiny_dirs, tmp_path, how):
    model = cut(tiny_dirs["gqa6"], tmp_path / "parts", 2, progress=False)
    timeout_s = 5.0
    proc, worker = start_runner(model, timeout_s)
    t0 = time.monotonic()
    os.kill(worker.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    try:
        code = proc.wait(timeout=timeout_s + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert code == 3, out
    assert "rank 1" in out or "rank failure" in out
    assert time.monotonic() - t0 < timeout_s + 30
    if how == "stop":
        assert_all_gone([worker], within_s=10)  # the launcher kills the stuck worker
    assert_all_gone([worker], within_s=1)


def test_killing_rank0_takes_the_workers_down(tiny_dirs, tmp_path):
    model = cut(tiny_dirs["gqa6"], tmp_path / "parts", 2, progress=False)
    proc, worker = start_runner(model, 5.0)
    proc.kill()
    proc.wait(timeout=10)
    assert_all_gone([worker], within_s=10)
