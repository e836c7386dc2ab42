"""Parity with transformers' LlamaForCausalLM on the same weights (float32)."""

import pytest
import torch

import tpllama
from helpers import TINY_CONFIGS, hf_greedy, hf_model

LOGIT_TOL = 1e-4


def our_logits(engine, ids: torch.Tensor) -> torch.Tensor:
    """Last-position logits [1, vocab] of one row, through the engine's runner."""
    engine.runner.ensure_cache(1, 256)
    positions = torch.arange(ids.shape[1])[None, :]
    return engine.runner.forward(ids, positions, slice(0, 1))[:, -1]


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_configs_match_transformers(tiny_dirs, name):
    ref = hf_model(tiny_dirs[name])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, ref.config.vocab_size, (1, 13), generator=g)
    with torch.no_grad():
        ref_logits = ref(ids).logits[:, -1]
    with tpllama.load(tiny_dirs[name]) as engine:
        assert (our_logits(engine, ids) - ref_logits).abs().max().item() <= LOGIT_TOL
        out = engine.generate(ids, max_new_tokens=32, ignore_eos=True)
    expected = hf_greedy(ref, ids, 32, eos=-1)
    assert torch.equal(out, expected)


def test_smollm2_matches_transformers(smol_hf_dir):
    ref = hf_model(smol_hf_dir)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 2, 198,
                         1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        ref_logits = ref(ids).logits[:, -1]
    with tpllama.load(smol_hf_dir) as engine:
        assert (our_logits(engine, ids) - ref_logits).abs().max().item() <= LOGIT_TOL
        out = engine.generate(ids, max_new_tokens=32, ignore_eos=True)
    assert torch.equal(out, hf_greedy(ref, ids, 32, eos=-1))


def test_gguf_and_hf_dir_give_the_same_logits(smol_gguf, smol_hf_dir):
    """Our GGUF reader (gguf dequantization + q/k un-permutation) vs transformers' GGUF conversion."""
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47]])
    with tpllama.load(smol_gguf) as engine:
        from_gguf = our_logits(engine, ids)
        assert engine.tokenizer is not None and engine.tokenizer.has_chat_template
    with tpllama.load(smol_hf_dir) as engine:
        from_hf = our_logits(engine, ids)
    assert (from_gguf - from_hf).abs().max().item() <= LOGIT_TOL


def test_bf16_and_fp16_run_close_to_float32(tiny_dirs):
    ids = torch.randint(3, 90, (1, 9), generator=torch.Generator().manual_seed(3))
    with tpllama.load(tiny_dirs["gqa6"]) as engine:
        ref = our_logits(engine, ids)
    for dtype in ("bfloat16", "float16"):
        with tpllama.load(tiny_dirs["gqa6"], dtype=dtype) as engine:
            assert engine.runner.model.norm.weight.dtype == getattr(torch, dtype)
            got = our_logits(engine, ids)
        assert (got - ref).abs().max().item() < 0.1 * ref.abs().max().item()
