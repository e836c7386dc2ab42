"""The decode-attention kernel of every kernel path this CPU runs equals the PyTorch path (masked
matmul + softmax); head dims that are and are not multiples of 16 (the avx512 path's width)."""

import pytest
import torch

from tpllama import kernels
from tpllama.model.llama import decode_attention

PATHS = kernels.runnable_paths() or ["avx2"]


@pytest.mark.skipif(not kernels.available(), reason="AVX2 kernels cannot be built on this machine")
@pytest.mark.parametrize("B,H,Hkv,L,D", [(1, 9, 3, 300, 64), (3, 6, 2, 50, 64), (2, 5, 1, 17, 32), (4, 8, 8, 9, 16),
                                         (2, 9, 3, 1100, 64), (1, 12, 2, 520, 40), (2, 4, 2, 70, 24)])
@pytest.mark.parametrize("path", PATHS)
def test_kernel_matches_torch(B, H, Hkv, L, D, path, monkeypatch):
    monkeypatch.setenv("TPLLAMA_KERNEL_PATH", path)
    g = torch.Generator().manual_seed(B * 100 + L)
    cache_k = torch.randn(B + 1, Hkv, 64 + L, D, generator=g)
    cache_v = torch.randn(B + 1, Hkv, 64 + L, D, generator=g)
    keys, values = cache_k[1:], cache_v[1:]  # strided views of a cache, as in the model
    keys, values = keys[:, :, :L], values[:, :, :L]
    q = torch.randn(B, H, 1, D, generator=g) * 3
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None, :] < lengths[:, None])[:, None, None, :]
    expected = decode_attention(q, keys, values, mask)
    got = decode_attention(q, keys, values, mask, lengths)
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.skipif(not kernels.available(), reason="AVX2 kernels cannot be built on this machine")
@pytest.mark.parametrize("path", PATHS)
def test_kernel_reads_float16_cache(path, monkeypatch):
    """A float16 KV cache gives the float32 result of the same (rounded) keys and values."""
    monkeypatch.setenv("TPLLAMA_KERNEL_PATH", path)
    g = torch.Generator().manual_seed(7)
    keys = torch.randn(2, 3, 600, 64, generator=g).half()
    values = torch.randn(2, 3, 600, 64, generator=g).half()
    q = torch.randn(2, 9, 1, 64, generator=g)
    lengths = torch.tensor([600, 257])
    mask = (torch.arange(600)[None, :] < lengths[:, None])[:, None, None, :]
    expected = decode_attention(q, keys.float(), values.float(), mask)
    got = decode_attention(q, keys, values, mask, lengths)
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.skipif(not kernels.available(), reason="AVX2 kernels cannot be built on this machine")
def test_attention_micro_benchmark_reports_its_figures():
    from tpllama.bench.kernels import bench_attention

    r = bench_attention(300, kv_heads=2, group=3, layers=3, threads=1, reps=2, probe_bytes=1 << 22)
    assert r["bytes_per_step"] == 3 * 2 * 2 * 300 * 64 * 2
    assert 0 < r["cold_ms_best"] <= r["cold_ms_median"] and 0 < r["hot_ms_best"] <= r["hot_ms_median"]
    assert r["cold_gbps"] > 0 and r["probe_gbps"] > 0 and r["isa"]
