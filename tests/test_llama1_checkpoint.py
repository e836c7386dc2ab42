"""The seed's own checkpoint layout (decapoda-research/llama-13b-hf): a sentencepiece tokenizer
that transformers cannot read as it is, LLaMA-1 config keys with wrong special ids, ``.bin``
shards with an index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import hf_greedy, hf_model, make_llama1_checkpoint  # noqa: E402

import tpllama  # noqa: E402
from tpllama.weights.parts import cut  # noqa: E402
from tpllama.weights.tokenizer import SentencePieceTokenizer  # noqa: E402

TEXTS = ["Hello world, the capital of France is Paris.", "  two  spaces and\nnew lines\t", "ünïcödé → 東京 🙂", ""]


@pytest.fixture(scope="module")
def llama1_dir(tmp_path_factory) -> Path:
    return make_llama1_checkpoint(tmp_path_factory.mktemp("llama1") / "llama-13b-hf-like")


@pytest.fixture(scope="module")
def sp(llama1_dir):
    return spm.SentencePieceProcessor(model_file=str(llama1_dir / "tokenizer.model"))


def test_fixture_has_the_decapoda_layout(llama1_dir):
    names = sorted(p.name for p in llama1_dir.iterdir())
    assert names == ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                     "pytorch_model.bin.index.json", "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    cfg = json.loads((llama1_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LLaMAForCausalLM"] and cfg["pad_token_id"] == -1
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 1) and "max_position_embeddings" not in cfg
    assert json.loads((llama1_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "LLaMATokenizer"


@pytest.mark.parametrize("world_size", [1, 2])
def test_tokenizer_is_sentencepiece_itself(llama1_dir, sp, world_size, tmp_path):
    src = llama1_dir if world_size == 1 else cut(llama1_dir, tmp_path / "tp2", 2, progress=False)
    with tpllama.load(src, world_size=world_size) as engine:
        tok = engine.tokenizer
        assert isinstance(tok, SentencePieceTokenizer)
        for text in TEXTS:
            assert tok.encode(text) == [1] + sp.encode(text)  # BOS prepended, as LLaMA-1 did
            assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
            assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
        ids = torch.randint(0, sp.get_piece_size(), (200,), generator=torch.Generator().manual_seed(1)).tolist()
        assert tok.decode(ids) == sp.decode(ids)
        assert tok.decode([1, 5, 2], skip_special_tokens=False) == "<s>" + sp.decode([5]) + "</s>"
        # EOS and padding from the tokenizer, not the config's wrong bos 0 / eos 1 / pad -1
        assert engine.eos_ids == (2,) and engine.pad_id == 2
        assert engine.args.max_seq_len == 2048  # max_sequence_length


def test_greedy_matches_transformers_at_1_and_2_ranks(llama1_dir, sp, tmp_path):
    ref = hf_model(llama1_dir)
    prompts = ["the cat sat on a mat", "what is the capital of France?"]
    parts = cut(llama1_dir, tmp_path / "tp2", 2, progress=False)
    for src, n in ((llama1_dir, 1), (parts, 2)):
        with tpllama.load(src, world_size=n) as engine:
            for text in prompts:
                ids = torch.tensor([engine.tokenizer.encode(text)])
                want = hf_greedy(ref, ids, 20, eos=2)[0].tolist()
                got = engine.generate(ids, max_new_tokens=20)[0].tolist()
                # transformers stops at EOS and pads with 0, tpllama pads with its pad id: compare up to EOS
                end = lambda row: row[: row.index(2, ids.shape[1]) + 1] if 2 in row[ids.shape[1]:] else row  # noqa: E731
                assert end(got) == end(want), (n, text)


def test_cli_generates_from_the_seed_layout(llama1_dir, fresh_cache):
    proc = subprocess.run([sys.executable, "-m", "tpllama", "generate", "--model", str(llama1_dir), "--world-size", "2",
                           "--prompt", "the cat sat", "--max-new-tokens", "4", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, TPLLAMA_CACHE=str(fresh_cache)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiktoken" not in proc.stderr

