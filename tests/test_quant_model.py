"""Quantized models: parity with float within stated tolerances, cut/load of quantized parts."""

import json

import pytest
import torch

import tpllama
from tpllama.weights.parts import cut

# int8 weights (per 32-block) x int8 activations: logits within 5% of the float logits' range;
# int4: within 25%. Gaussian random weights are the worst case for 4 bits (measured here: ~16%);
# on SmolLM2 the agreement with float is measured by `tpllama quality` (see README).
TOLERANCE = {"int8": 0.05, "int4": 0.25}


def last_logits(engine, ids):
    engine.runner.ensure_cache(1, 128)
    return engine.runner.forward(ids, torch.arange(ids.shape[1])[None], slice(0, 1))[0, -1]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_logits_close_to_float(tiny_dirs, ids, scheme):
    with tpllama.load(tiny_dirs["q32"]) as engine:
        ref = last_logits(engine, ids)
    with tpllama.load(tiny_dirs["q32"], quant=scheme) as engine:
        model = engine.runner.model
        assert model.layers[0].attention.wqkv.scheme == scheme and model.layers[1].feed_forward.w_down.scheme == scheme
        got = last_logits(engine, ids)
    spread = (ref.max() - ref.min()).item()
    assert (got - ref).abs().max().item() <= TOLERANCE[scheme] * spread


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_parts_load_at_1_2_3(tiny_dirs, tmp_path, ids, scheme):
    with tpllama.load(tiny_dirs["q32"], quant=scheme) as engine:
        ref_logits, ref_out = last_logits(engine, ids), engine.generate(ids, max_new_tokens=12, ignore_eos=True)
    for n in (1, 2, 3):
        parts = cut(tiny_dirs["q32"], tmp_path / f"{scheme}-tp{n}", n, quant=scheme, progress=False)
        manifest = json.loads((parts / "manifest.json").read_text())
        assert manifest["quant"] == scheme
        with tpllama.load(parts, world_size=n) as engine:
            logits = last_logits(engine, ids)
            out = engine.generate(ids, max_new_tokens=12, ignore_eos=True)
        # the same int blocks on every rank split; only the float summation order differs
        assert (logits - ref_logits).abs().max().item() <= 1e-3 * (ref_logits.abs().max().item() + 1)
        assert torch.equal(out, ref_out), n


def test_gguf_blocks_imported_natively_and_tp_agrees(smol_gguf, tmp_path):
    """quant=auto keeps the file's Q4_1/Q8_0 blocks: same greedy tokens at N=1 and N=2."""
    with tpllama.load(smol_gguf, quant="auto") as engine:
        ids = torch.tensor([engine.encode_chat([{"role": "user", "content": "What is the capital of France?"}])])
        layer = engine.runner.model.layers[0]
        assert layer.feed_forward.w_gate_up.scheme == "int4" and layer.attention.wqkv.scheme == "int4"
        head = engine.runner.model.output  # the Q8_0 embedding re-quantizes to its own blocks
        assert head.scheme == "int8" and head.float_activations
        assert torch.equal(head.dequantize(), engine.runner.model.tok_embeddings.weight)
        one = engine.generate(ids, max_new_tokens=24, ignore_eos=True)
        text = engine.tokenizer.decode(one[0, ids.shape[1]:])
    assert "Paris" in text
    parts = cut(smol_gguf, tmp_path / "auto-tp2", 2, quant="auto", progress=False)
    with tpllama.load(parts, world_size=2) as engine:
        assert torch.equal(engine.generate(ids, max_new_tokens=24, ignore_eos=True), one)
