"""The fused C++ decode blocks (tpllama.model.fused) against the modules' decode path, same weights."""

import pytest
import torch

import tpllama
from helpers import make_tiny_hf
from tpllama import kernels
from tpllama.engine.runner import run_model
from tpllama.model.fused import fused_layers

pytestmark = pytest.mark.skipif(not kernels.available(), reason="AVX2 kernels cannot be built on this machine")


@pytest.fixture(scope="module")
def long_q32(tmp_path_factory):
    """The all-32-widths tiny config with room for contexts longer than one attention chunk (256)."""
    return make_tiny_hf(tmp_path_factory.mktemp("q32-long"), "q32", seed=5, max_position_embeddings=1024)


def _prefill(model, lengths, slots):
    """Fill each slot with a random prompt of the given length (the modules' prefill path)."""
    g = torch.Generator().manual_seed(3)
    for n, slot in zip(lengths, slots):
        ids = torch.randint(3, 140, (1, n), generator=g)
        model(ids, torch.arange(n)[None], slice(slot, slot + 1))


def _step(model, fused: bool, tokens, positions, rows):
    """A decode step as the runner runs it (it chooses the fused blocks when the model allows)."""
    model.fused_decode = fused
    try:
        return run_model(model, tokens, positions, rows)[:, 0]
    finally:
        model.fused_decode = True


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fused_step_matches_modules(long_q32, scheme):
    """A batched decode step over scattered slots, contexts of 1 to 3 attention chunks: the same
    logits and the same KV-cache writes as the modules' path."""
    with tpllama.load(long_q32, quant=scheme) as engine:
        model = engine.runner.model
        assert fused_layers(model) is not None
        with torch.inference_mode():
            model.ensure_cache(4, 1024)
            lengths, slots = [700, 5, 300], [3, 0, 2]
            _prefill(model, lengths, slots)
            tokens = torch.tensor([[17], [23], [99]])
            positions = torch.tensor(lengths)[:, None]
            rows = torch.tensor(slots)
            before_k, before_v = model.cache.k.clone(), model.cache.v.clone()
            ref = _step(model, False, tokens, positions, rows)
            ref_k, ref_v = model.cache.k.clone(), model.cache.v.clone()
            model.cache.k.copy_(before_k)
            model.cache.v.copy_(before_v)
            got = _step(model, True, tokens, positions, rows)
    # same int blocks, only the float rounding order differs (measured: ~1e-6 on a spread of ~7)
    spread = (ref.max() - ref.min()).item()
    assert (got - ref).abs().max().item() <= 1e-4 * spread
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(model.cache.k, ref_k, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.cache.v, ref_v, rtol=1e-4, atol=1e-4)


def test_fused_generation_matches_modules(long_q32):
    """Greedy generation through the fused blocks equals the modules' path, token for token."""
    ids = torch.randint(3, 140, (2, 40), generator=torch.Generator().manual_seed(9))
    with tpllama.load(long_q32, quant="int8") as engine:
        fused = engine.generate(ids, max_new_tokens=30, ignore_eos=True)
        engine.runner.model.fused_decode = False
        plain = engine.generate(ids, max_new_tokens=30, ignore_eos=True)
    assert torch.equal(fused, plain)


def test_float_model_is_not_fused(long_q32):
    """Float weights keep the modules' path (the fused blocks take quantized layers only)."""
    with tpllama.load(long_q32) as engine:
        assert fused_layers(engine.runner.model) is None


def test_fused_disabled_with_kernels(long_q32, monkeypatch):
    """TPLLAMA_NO_KERNELS=1 turns the fused path off along with the other kernels."""
    with tpllama.load(long_q32, quant="int8") as engine:
        monkeypatch.setenv("TPLLAMA_NO_KERNELS", "1")
        assert fused_layers(engine.runner.model) is None


def test_decode_layer_rejects_bad_inputs(long_q32):
    with tpllama.load(long_q32, quant="int8") as engine:
        model = engine.runner.model
        layer = fused_layers(model).layers[0]
        model.ensure_cache(2, 64)
        h = torch.zeros(1, model.args.dim)
        args = (model.rope_cos, model.rope_sin, model.cache.k[0], model.cache.v[0])
        with pytest.raises(RuntimeError, match="slot 5 out of range"):
            layer.attention(h, *args, torch.tensor([5]), torch.tensor([0]))
        with pytest.raises(RuntimeError, match="position 64 out of range"):
            layer.attention(h, *args, torch.tensor([0]), torch.tensor([64]))
        with pytest.raises(RuntimeError, match="h must be"):
            layer.mlp(torch.zeros(1, model.args.dim + 1))


def test_fused_blocks_rebuilt_after_new_weights(long_q32):
    """Reloading weights drops the fused blocks (which hold the old tensors); the next decode step
    builds them from the new ones."""
    ids = torch.randint(3, 140, (1, 20), generator=torch.Generator().manual_seed(2))
    with tpllama.load(long_q32, quant="int8") as engine:
        model = engine.runner.model
        first = engine.generate(ids, max_new_tokens=8, ignore_eos=True)
        assert model.fused is not None
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: (-v if k.endswith("qweight") else v) for k, v in state.items()})
        assert model.fused is None
        changed = engine.generate(ids, max_new_tokens=8, ignore_eos=True)
        model.fused_decode = False
        assert torch.equal(engine.generate(ids, max_new_tokens=8, ignore_eos=True), changed)
    assert not torch.equal(first, changed)


def test_decode_stack_equals_the_loop_over_blocks(long_q32):
    """``DecodeStack.run`` (every block in one C++ call, ``reduce`` called back between halves)
    gives exactly the Python loop over the blocks with the same reduce, and leaves h alone."""
    with tpllama.load(long_q32, quant="int4") as engine:
        model = engine.runner.model
        fused = fused_layers(model)
        with torch.inference_mode():
            model.ensure_cache(2, 64)
            h = torch.randn(2, model.args.dim, generator=torch.Generator().manual_seed(4))
            h0 = h.clone()
            slots, positions = torch.tensor([1, 0]), torch.tensor([0, 0])
            calls = []

            def halve(x):  # a stand-in all-reduce that changes the values, so its use is visible
                calls.append(tuple(x.shape))
                return x * 0.5

            cache = model.cache
            got = fused(h, model.rope_cos, model.rope_sin, cache, slots, positions, halve)
            assert torch.equal(h, h0) and len(calls) == 2 * model.args.n_layers
            ref = h.clone()
            for layer, k, v in zip(fused.layers, cache.layer_k, cache.layer_v):
                ref = ref + halve(layer.attention(ref, model.rope_cos, model.rope_sin, k, v, slots, positions))
                ref = ref + halve(layer.mlp(ref))
            assert torch.equal(got, ref)
            with pytest.raises(RuntimeError, match="reduce must return"):
                fused(h, model.rope_cos, model.rope_sin, cache, slots, positions, lambda x: x[:, :-1])

            def broken(x):
                raise ValueError("peer gone")

            with pytest.raises(ValueError, match="peer gone"):  # a failing all-reduce reaches the caller
                fused(h, model.rope_cos, model.rope_sin, cache, slots, positions, broken)
