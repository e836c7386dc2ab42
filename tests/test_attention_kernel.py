"""The AVX2 decode-attention kernel equals the PyTorch path (masked matmul + softmax)."""

import pytest
import torch

from tpllama import kernels
from tpllama.model.llama import decode_attention


@pytest.mark.skipif(not kernels.available(), reason="AVX2 kernels cannot be built on this machine")
@pytest.mark.parametrize("B,H,Hkv,L,D", [(1, 9, 3, 300, 64), (3, 6, 2, 50, 64), (2, 5, 1, 17, 32), (4, 8, 8, 9, 16),
                                         (2, 9, 3, 1100, 64)])
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


@pytest.mark.skipif(not kernels.available(), reason="AVX2 kernels cannot be built on this machine")
def test_kernel_reads_float16_cache():
    """A float16 KV cache gives the float32 result of the same (rounded) keys and values."""
    g = torch.Generator().manual_seed(7)
    keys = torch.randn(2, 3, 600, 64, generator=g).half()
    values = torch.randn(2, 3, 600, 64, generator=g).half()
    q = torch.randn(2, 9, 1, 64, generator=g)
    lengths = torch.tensor([600, 257])
    mask = (torch.arange(600)[None, :] < lengths[:, None])[:, None, None, :]
    expected = decode_attention(q, keys.float(), values.float(), mask)
    got = decode_attention(q, keys, values, mask, lengths)
    assert (got - expected).abs().max().item() < 1e-5


# ---------------------------------------------------------------- ranks sharing a KV group's keys
U = 4096  # position units of the fractions below (any positive number works)
# SmolLM2's heads at N = 2: rank 0 KV heads 0-1 with the first half of head 1's keys, rank 1 the rest
RANKS = [dict(heads=(0, 6), kv=(0, 2), fractions=((0, U), (0, U // 2))),
         dict(heads=(3, 9), kv=(1, 3), fractions=((U // 2, U), (0, U)))]


@pytest.mark.skipif(not kernels.available(), reason="AVX2 kernels cannot be built on this machine")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fused_attend_and_finish_of_two_ranks_equal_the_whole_layer(scheme):
    """DecodeLayer.attend on each rank's slice of a layer, merged by finish, against the whole
    layer: each rank's part of the shared head over its half of the keys, the parts merged by
    their log-sum-exps to the whole layer's attention (float rounding), and the projected sum of
    the ranks to the whole layer's output; contexts of 1 (no keys of the shared head on rank 0)
    to 3 chunks."""
    from tpllama.model.quant import quantize_weight

    ext = kernels.get()
    g = torch.Generator().manual_seed(5)
    dim, D = 96, 32
    wq, wk, wv = (torch.randn(n * D, dim, generator=g) * 0.1 for n in (9, 3, 3))
    wo, w_gu, w_down = torch.randn(dim, 9 * D, generator=g) * 0.1, torch.randn(64, dim, generator=g), torch.randn(dim, 32, generator=g)

    def packed(w):
        lin = quantize_weight(w, scheme)
        return lin, ext.PackedLinear(lin.qpack, lin.spack, getattr(lin, "mpack", None), lin.out_features)

    keep = []

    def layer(heads, kv, fractions):
        rows = lambda w, r: w[r[0] * D : r[1] * D]  # noqa: E731
        parts = [packed(torch.cat([rows(wq, heads), rows(wk, kv), rows(wv, kv)])), packed(wo[:, heads[0] * D : heads[1] * D]),
                 packed(w_gu), packed(w_down)]
        keep.append(parts)
        return ext.DecodeLayer(torch.ones(dim), torch.ones(dim), 1e-5, *(p[1] for p in parts), heads[1] - heads[0],
                               kv[1] - kv[0], D, torch.tensor(fractions), U, heads[0])

    whole = layer((0, 9), (0, 3), ((0, U),) * 3)
    ranks = [layer(r["heads"], r["kv"], r["fractions"]) for r in RANKS]
    with pytest.raises(RuntimeError, match="use attend"):
        ranks[0].attention(torch.zeros(1, dim), torch.ones(8, D), torch.zeros(8, D), torch.zeros(1, 2, 8, D),
                           torch.zeros(1, 2, 8, D), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    L = 700
    cos, sin = torch.randn(L, D, generator=g), torch.randn(L, D, generator=g)
    cache_k, cache_v = torch.randn(1, 3, L, D, generator=g).half(), torch.randn(1, 3, L, D, generator=g).half()
    for n in (1, 2, 7, 256, 513, 700):
        h = torch.randn(1, dim, generator=g)
        pos, slot = torch.tensor([n - 1]), torch.tensor([0])
        ref_part = torch.empty(1, 9 * (D + 1))
        whole.attend(h, cos, sin, cache_k, cache_v, slot, pos, ref_part)
        ref = whole.attention(h, cos, sin, cache_k, cache_v, slot, pos)
        parts = []
        for r, rank in zip(ranks, RANKS):
            part = torch.empty(1, 9 * (D + 1))
            kv = slice(*rank["kv"])
            r.attend(h, cos, sin, cache_k[:, kv].clone(), cache_v[:, kv].clone(), slot, pos, part)
            parts.append(part)
        att, lse = torch.stack(parts)[:, 0, : 9 * D].view(2, 9, D), torch.stack(parts)[:, 0, 9 * D :]  # [2, 9, D], [2, 9]
        assert torch.isinf(lse[1, :3]).all() and torch.isinf(lse[0, 6:]).all() and (att[0, 6:] == 0).all()
        assert torch.isinf(lse[0, 3:6]).all() == (n == 1)  # one key: rank 0's half of it is empty
        total = torch.logsumexp(lse, dim=0)
        merged = (att * torch.exp(lse - total).unsqueeze(-1)).sum(0)
        assert (merged - ref_part[0, : 9 * D].view(9, D)).abs().max().item() < 1e-5, n
        out = sum(r.finish(torch.stack(parts)) for r in ranks)
        assert (out - ref).abs().max().item() <= 1e-3 * ref.abs().max().item(), n
