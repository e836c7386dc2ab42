"""The CUDA path: the model on a GPU, quantized layers through the PyTorch reference (dequantize +
matmul), no CPU kernels, nccl between ranks (one GPU per rank).

These tests need a CUDA GPU. CI has none, so there they are skipped; `scripts/gpu-check.sh` runs
them (and the CUDA benchmarks) on a GPU machine, and the README gives what they gave there.
The device checks that need no GPU (a clear error when CUDA is asked for and absent) are in
test_errors.py and run everywhere.
"""

import json

import pytest
import torch

import tpllama
from helpers import TINY_CONFIGS, hf_greedy, hf_model
from tpllama.weights.parts import cut

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none); "
                                "scripts/gpu-check.sh runs these on a GPU machine")

LOGIT_TOL = 1e-4  # float32 on the GPU against transformers float32 on the CPU
QUANT_TOL = {"int8": 0.05, "int4": 0.25}  # of the float logits' spread, as in test_quant_model.py


def last_logits(engine, ids: torch.Tensor) -> torch.Tensor:
    """Last-position logits [vocab] of one row (CPU float32)."""
    engine.runner.ensure_cache(1, 256)
    return engine.runner.forward(ids, torch.arange(ids.shape[1])[None, :], slice(0, 1))[0, -1].float()


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_configs_match_transformers_on_cuda(tiny_dirs, name):
    ref = hf_model(tiny_dirs[name])
    ids = torch.randint(3, ref.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = ref(ids).logits[0, -1]
    with tpllama.load(tiny_dirs[name], device="cuda") as engine:
        assert engine.runner.model.norm.weight.is_cuda and engine.info["device"].startswith("cuda")
        assert (last_logits(engine, ids) - ref_logits).abs().max().item() <= LOGIT_TOL
        out = engine.generate(ids, max_new_tokens=32, ignore_eos=True)
    assert torch.equal(out, hf_greedy(ref, ids, 32, eos=-1))


def test_bf16_and_fp16_on_cuda_close_to_float32(tiny_dirs):
    ids = torch.randint(3, 90, (1, 9), generator=torch.Generator().manual_seed(3))
    with tpllama.load(tiny_dirs["gqa6"], device="cuda") as engine:
        ref = last_logits(engine, ids)
    for dtype in ("bfloat16", "float16"):
        with tpllama.load(tiny_dirs["gqa6"], dtype=dtype, device="cuda") as engine:
            assert engine.runner.model.norm.weight.dtype == getattr(torch, dtype)
            assert engine.info["kv_cache"] == dtype  # auto: the model's dtype off the CPU
            got = last_logits(engine, ids)
        assert (got - ref).abs().max().item() < 0.1 * ref.abs().max().item()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_layers_on_cuda(tiny_dirs, monkeypatch, scheme):
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(11))
    with tpllama.load(tiny_dirs["q32"]) as engine:
        ref = last_logits(engine, ids)
    with tpllama.load(tiny_dirs["q32"], quant=scheme, device="cuda") as engine:
        lin = engine.runner.model.layers[0].attention.wqkv
        assert lin.scheme == scheme and lin.qpack.is_cuda
        got = last_logits(engine, ids)
        out = engine.generate(ids, max_new_tokens=12, ignore_eos=True)
    spread = (ref.max() - ref.min()).item()
    assert (got - ref).abs().max().item() <= QUANT_TOL[scheme] * spread
    # the CPU's pure-PyTorch path dequantizes the same blocks the same way: same greedy tokens
    monkeypatch.setenv("TPLLAMA_NO_KERNELS", "1")
    with tpllama.load(tiny_dirs["q32"], quant=scheme) as engine:
        cpu_out = engine.generate(ids, max_new_tokens=12, ignore_eos=True)
    assert torch.equal(out, cpu_out)


def test_padded_batch_on_cuda_gives_each_rows_own_tokens(tiny_dirs):
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(3, 90, (1, 7), generator=g), torch.randint(3, 90, (1, 11), generator=g)
    ids = torch.zeros(2, 11, dtype=torch.int64)
    mask = torch.zeros(2, 11, dtype=torch.int64)
    ids[0, 4:], mask[0, 4:] = a[0], 1  # left padding
    ids[1], mask[1] = b[0], 1
    with tpllama.load(tiny_dirs["smol-like"], device="cuda") as engine:
        batched = engine.generate(ids, attention_mask=mask, max_new_tokens=16, ignore_eos=True)
        alone_a = engine.generate(a, max_new_tokens=16, ignore_eos=True)
        alone_b = engine.generate(b, max_new_tokens=16, ignore_eos=True)
    assert torch.equal(batched[0, 11:], alone_a[0, 7:])
    assert torch.equal(batched[1, 11:], alone_b[0, 11:])


@pytest.mark.parametrize("n", [2, 3])
def test_n_ranks_on_cuda_need_n_gpus(tiny_dirs, tmp_path, n):
    """With n GPUs: n ranks over nccl give the tokens of one rank. With fewer: refused up front,
    naming what is allowed."""
    ids = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(7))
    parts = cut(tiny_dirs["smol-like"], tmp_path / f"tp{n}", n, progress=False)
    assert json.loads((parts / "manifest.json").read_text())["world_size"] == n
    if torch.cuda.device_count() < n:
        with pytest.raises(ValueError, match=f"{n} ranks on this host need {n} GPUs"):
            tpllama.load(parts, world_size=n, device="cuda")
        return
    with tpllama.load(tiny_dirs["smol-like"], device="cuda") as engine:
        ref = engine.generate(ids, max_new_tokens=16, ignore_eos=True)
    with tpllama.load(parts, world_size=n, device="cuda", timeout_s=120) as engine:
        assert engine.info["backend"] == "nccl"
        assert torch.equal(engine.generate(ids, max_new_tokens=16, ignore_eos=True), ref)
