"""The AVX2 decode-attention kernel equals the PyTorch path (masked matmul + softmax)."""

import pytest
import torch

from tpllama import kernels
from tpllama.model import decode_attention


@pytest.mark.skipif(not kernels.available(), reason="AVX2 kernels cannot be built on this machine")
@pytest.mark.parametrize("B,H,Hkv,L,D", [(1, 9, 3, 300, 64), (3, 6, 2, 50, 64), (2, 5, 1, 17, 32), (4, 8, 8, 9, 16)])
def test_kernel_matches_torch(B, H, Hkv, L, D):
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
