"""Splits that fit real clusters: more ranks than KV heads, shares for uneven hosts, re-cutting a
cut without the original checkpoint."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tpllama
from tpllama.config import ModelArgs
from tpllama.parallel.plan import ShardError, plan
from tpllama.weights.checkpoint import CheckpointError
from tpllama.weights.parts import cut
from tpllama.weights.recut import recut

PROMPTS = [[5, 6, 7, 8, 9], [11, 3, 42, 17, 89, 23, 5, 61]]
SMOL = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_dim=1536, head_dim=64)


def greedy(source, world_size: int, new: int = 16) -> list[list[int]]:
    with tpllama.load(source, world_size=world_size) as engine:
        return [engine.generate(torch.tensor([p]), max_new_tokens=new, ignore_eos=True)[0].tolist() for p in PROMPTS]


def digests(directory: Path) -> dict[str, str]:
    return {str(f.relative_to(directory)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted((directory / "part_model").rglob("*")) if f.is_file()}


# ---------------------------------------------------------------------- the plan
def test_more_ranks_than_kv_heads_share_copies_of_kv_heads():
    for n in (4, 5, 6, 9):
        shares = plan(SMOL, n)
        heads = [s.heads for s in shares]
        assert heads[0][0] == 0 and heads[-1][1] == 9 and all(a[1] == b[0] for a, b in zip(heads, heads[1:]))
        for s in shares:  # one KV head each: the one its query heads use
            assert s.n_kv_heads == 1 and s.kv_heads == (s.heads[0] // 3, s.heads[0] // 3 + 1)
            assert (s.heads[1] - 1) // 3 == s.heads[0] // 3
        assert max(s.n_heads for s in shares) - min(s.n_heads for s in shares) <= 2
    assert [s.heads for s in plan(SMOL, 4)] == [(0, 3), (3, 6), (6, 7), (7, 9)]
    with pytest.raises(ShardError, match="world size 10 is larger than the model's 9 query heads"):
        plan(SMOL, 10)


def test_shares_give_each_rank_its_proportion_of_heads_ffn_and_vocabulary():
    for proportions in ([3, 1], [1, 3], [1, 1, 2], [2.5, 1], [1, 2, 5]):
        shares = plan(SMOL, len(proportions), proportions)
        total = sum(proportions)
        kv = [s.n_kv_heads for s in shares]  # whole KV groups, as near the proportion as whole groups go
        assert sum(kv) == 3 and all(abs(k - 3 * p / total) < 1 for k, p in zip(kv, proportions)), (proportions, kv)
        ffn = [s.ffn_dim for s in shares]  # each half of a layer in proportion on its own
        assert sum(ffn) == 1536 and all(abs(f - 1536 * p / total) <= 32 for f, p in zip(ffn, proportions))
        vocab = [s.vocab_rows for s in shares]
        assert all(abs(v - 49152 * p / total) <= 1 for v, p in zip(vocab, proportions))
    for bad, match in (([1], "1 shares .* for 2 ranks"), ([1, 0], "positive"), ([1, "x"], "numbers")):
        with pytest.raises(ShardError, match=match):
            plan(SMOL, 2, bad)


# ---------------------------------------------------------------------- greedy ids
@pytest.mark.parametrize("name,sizes", [("smol-like", (4, 6)), ("gqa6", (5,))])
def test_more_ranks_than_kv_heads_give_the_tokens_of_one(tiny_dirs, tmp_path, name, sizes):
    want = greedy(tiny_dirs[name], 1)
    for n in sizes:
        parts = cut(tiny_dirs[name], tmp_path / f"tp{n}", n, progress=False)
        with tpllama.load(parts, world_size=n) as engine:
            got = [engine.generate(torch.tensor([p]), max_new_tokens=16, ignore_eos=True)[0].tolist() for p in PROMPTS]
            assert engine.runner.model.cache.k.shape[2] == 1  # rank 0's cache: the one KV head it uses
        assert got == want, n


def test_default_model_on_four_ranks(smol_gguf, tmp_path):
    """SmolLM2 has 3 KV heads: four ranks used to be refused."""
    with tpllama.load(smol_gguf) as engine:
        ids = engine.tokenizer.chat([{"role": "user", "content": "What is the capital of France?"}])
        want = engine.generate(torch.tensor([ids]), max_new_tokens=12)
    with tpllama.load(smol_gguf, world_size=4, timeout_s=120) as engine:
        assert [s.n_kv_heads for s in engine.shares] == [1, 1, 1, 1]
        assert torch.equal(engine.generate(torch.tensor([ids]), max_new_tokens=12), want)


@pytest.mark.parametrize("proportions", [(3, 1), (1, 3), (1, 2, 5)])
def test_any_shares_give_the_tokens_of_one(tiny_dirs, tmp_path, proportions):
    want = greedy(tiny_dirs["smol-like"], 1)
    n = len(proportions)
    parts = cut(tiny_dirs["smol-like"], tmp_path / "parts", n, progress=False, proportions=proportions)
    assert json.loads((parts / "manifest.json").read_text())["shares"] == list(map(float, proportions))
    assert greedy(parts, n) == want


def test_load_with_shares_cuts_with_them(tiny_dirs, fresh_cache, monkeypatch):
    monkeypatch.setenv("TPLLAMA_CACHE", str(fresh_cache))
    with tpllama.load(tiny_dirs["smol-like"], world_size=2, shares="3,1") as engine:
        assert [s.to_json() for s in engine.shares] == [s.to_json() for s in plan(engine.args, 2, (3, 1))]
        assert json.loads((Path(engine.info["parts"]) / "manifest.json").read_text())["shares"] == [3.0, 1.0]
    with pytest.raises(ValueError, match="1 number\\(s\\) for 2 rank"):
        tpllama.load(tiny_dirs["smol-like"], world_size=2, shares="3")


# ---------------------------------------------------------------------- re-cutting
@pytest.mark.parametrize("name,quant,first,second", [
    ("smol-like", None, dict(n=2, shares=(3, 1)), dict(n=3, shares=None)),
    ("smol-like", None, dict(n=4, shares=None), dict(n=2, shares=(1, 2))),
    ("q32", "int8", dict(n=3, shares=None), dict(n=2, shares=None)),
    ("q32", "int4", dict(n=2, shares=(1, 3)), dict(n=3, shares=(2, 1, 1))),
])
def test_recut_is_byte_identical_to_cutting_the_original(tiny_dirs, tmp_path, name, quant, first, second):
    src = tiny_dirs[name]
    a = cut(src, tmp_path / "a", first["n"], quant=quant, progress=False, proportions=first["shares"])
    direct = cut(src, tmp_path / "direct", second["n"], quant=quant, progress=False, proportions=second["shares"])
    again = recut(a, tmp_path / "again", second["n"], second["shares"], progress=False)
    assert digests(again) == digests(direct)
    assert json.loads((again / "manifest.json").read_text())["ranks"] == json.loads(
        (direct / "manifest.json").read_text())["ranks"]
    if quant is None:
        assert greedy(again, second["n"]) == greedy(src, 1)


def test_recut_from_the_command_line_and_a_damaged_part(tiny_dirs, tmp_path):
    a = cut(tiny_dirs["gqa6"], tmp_path / "a", 3, progress=False)
    run = [sys.executable, "-m", "tpllama", "cut", "--input", str(a), "--world-size", "2"]
    ok = subprocess.run(run + ["--output", str(tmp_path / "b")], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert digests(tmp_path / "b") == digests(cut(tiny_dirs["gqa6"], tmp_path / "direct", 2, progress=False))
    refused = subprocess.run(run + ["--output", str(tmp_path / "c"), "--quant", "int8"], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "keeps them as they are" in refused.stderr
    f = a / "part_model" / "1" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="part_model/1/model.safetensors is corrupt"):
        recut(a, tmp_path / "d", 2, progress=False)
    assert not (tmp_path / "d").exists()
