"""The KV cache element type: choices, the auto rule, float16 through every path and every rank."""

import pytest
import torch

import tpllama
from tpllama.engine.runner import CMD_STOP, ModelRunner, follow
from tpllama.model.kv_cache import KVCache


def test_bad_choice_refused_before_loading(tiny_dirs):
    with pytest.raises(ValueError, match="kv_cache 'int8' is not supported; allowed: auto, float32, float16"):
        tpllama.load(tiny_dirs["q32"], kv_cache="int8")


@pytest.mark.parametrize("quant,choice,expected", [
    (None, "auto", "float32"), ("int8", "auto", "float16"), ("int4", "float32", "float32"), (None, "float16", "float16"),
])
def test_auto_rule_and_explicit_choices(tiny_dirs, quant, choice, expected):
    with tpllama.load(tiny_dirs["q32"], quant=quant, kv_cache=choice) as engine:
        assert engine.info["kv_cache"] == expected
        engine.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
        assert engine.runner.model.cache.k.dtype == getattr(torch, expected)


# float weights: float16 rounding only (measured 0.02% of the spread); int8: the int8-rounded
# activations turn some of those tiny changes into whole rounding steps (measured 0.7%)
@pytest.mark.parametrize("quant,tolerance", [(None, 5e-3), ("int8", 2e-2)])
def test_float16_cache_close_to_float32(tiny_dirs, quant, tolerance):
    """Keys and values rounded to float16 (prefill through SDPA, decode through the kernels or the
    fused blocks) move the logits by far less than their spread."""
    ids = torch.randint(3, 140, (2, 30), generator=torch.Generator().manual_seed(4))
    logits = {}
    for choice in ("float32", "float16"):
        with tpllama.load(tiny_dirs["q32"], quant=quant, kv_cache=choice) as engine:
            runner = engine.runner
            runner.ensure_cache(2, 64)
            runner.forward(ids, torch.arange(30).expand(2, 30), slice(0, 2))
            logits[choice] = runner.forward(torch.tensor([[9], [11]]), torch.tensor([[30], [30]]), slice(0, 2))
    ref, got = logits["float32"], logits["float16"]
    spread = (ref.max() - ref.min()).item()
    assert 0 < (got - ref).abs().max().item() <= tolerance * spread


class _Recorder:
    """A stand-in for the rank group: rank 0's broadcasts are recorded, then replayed to a follower."""

    world_size = 2

    def __init__(self):
        self.sent = []

    def broadcast(self, x, src=0, idle=False):
        if self.replay is None:
            self.sent.append(x.clone())
        else:
            x.copy_(self.replay.pop(0))
        return x

    replay = None


def test_other_ranks_get_the_cache_dtype(tiny_dirs):
    """Rank 0 sends the KV dtype with the cache command; a following rank allocates the same."""
    with tpllama.load(tiny_dirs["q32"], quant="int8") as leader, tpllama.load(tiny_dirs["q32"], quant="int8") as other:
        ctx = _Recorder()
        runner = ModelRunner(leader.runner.model, ctx, torch.float16)
        runner.ensure_cache(3, 48)
        runner.stop()
        assert [int(m[0]) for m in ctx.sent][-1] == CMD_STOP
        ctx.replay = list(ctx.sent)
        follow(other.runner.model, ctx)
        cache = other.runner.model.cache
        assert cache.k.dtype == torch.float16 and cache.slots == 3 and cache.max_len == 48


def test_layer_views_follow_the_buffers():
    cache = KVCache(3, 2, 1, 8, 4, torch.float32, "cpu")
    assert len(cache.layer_k) == 3 and cache.layer_v[2].shape == (2, 1, 8, 4)
    cache.layer_k[1][0, 0, 5] = 7.0
    assert float(cache.k[1, 0, 0, 5, 0]) == 7.0
    cache.half()
    assert cache.layer_k[1].dtype == torch.float16 and cache.layer_k[1].data_ptr() == cache.k[1].data_ptr()
    assert float(cache.layer_k[1][0, 0, 5, 0]) == 7.0
