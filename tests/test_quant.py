"""Tests for tpllama.model.quant (block-quantized linear layers) and the AVX2 kernels."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tpllama import kernels
from tpllama.model import quant
from tpllama.model.quant import (QUANT_SCHEMES, Int4Linear, Int8Linear, QuantLinear, cat_rows, from_gguf_blocks,
                           quantize_weight, stored_names)

from helpers import quantize_activations as _quantize_act
from helpers import random_weight as _w

gguf = pytest.importorskip("gguf")
GT = gguf.GGMLQuantizationType

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="AVX2 kernels not available here")


def _fallback(mod, x, monkeypatch):
    monkeypatch.setenv("TPLLAMA_NO_KERNELS", "1")
    try:
        assert kernels.get() is None
        return mod(x)
    finally:
        monkeypatch.delenv("TPLLAMA_NO_KERNELS")


# --------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
@pytest.mark.parametrize("out", [5, 37, 192])
@pytest.mark.parametrize("kin", [32, 96, 576])
def test_round_trip_error_bound(scheme, out, kin):
    w = _w(out, kin, seed=out + kin)
    mod = quantize_weight(w, scheme)
    assert (mod.in_features, mod.out_features, mod.scheme) == (kin, out, scheme)
    deq = mod.dequantize()
    assert deq.dtype == torch.float32 and deq.shape == (out, kin)
    blocks = w.reshape(out, kin // 32, 32)
    err = (deq.reshape(out, kin // 32, 32) - blocks).abs().amax(-1)
    if scheme == "int8":
        step = blocks.abs().amax(-1) / 127  # half a step, plus float16 rounding of the scale
        bound = 0.5 * step + blocks.abs().amax(-1) * 2e-3
    else:
        step = (blocks.amax(-1) - blocks.amin(-1)) / 15
        bound = 0.5 * step + blocks.abs().amax(-1) * 2e-3
    assert bool((err <= bound + 1e-7).all()), float((err - bound).max())


@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
def test_from_float_any_dtype_and_zero_blocks(scheme):
    w = _w(8, 64)
    w[:, :32] = 0  # all-zero blocks must not give NaN
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        deq = quantize_weight(w.to(dt), scheme).dequantize()
        assert torch.isfinite(deq).all()
        assert torch.equal(deq[:, :32], torch.zeros(8, 32))


@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
def test_stored_form_and_state_dict(scheme):
    mod = quantize_weight(_w(37, 96), scheme)
    st = mod.stored_tensors()
    assert tuple(st) == stored_names(scheme)
    assert st["qweight"].shape == ((37, 96) if scheme == "int8" else (37, 48))
    assert st["qweight"].dtype == (torch.int8 if scheme == "int8" else torch.uint8)
    assert st["scales"].shape == (37, 3) and st["scales"].dtype == torch.float16
    sd = mod.state_dict()
    assert set(sd) == set(stored_names(scheme))
    for n in sd:
        assert torch.equal(sd[n], st[n])
    # state dict of a parent module carries the prefix; load_state_dict accepts the stored form
    parent = torch.nn.Module()
    parent.proj = quantize_weight(_w(37, 96, seed=1), scheme)
    parent.load_state_dict({"proj." + k: v for k, v in sd.items()})
    assert torch.equal(parent.proj.dequantize(), mod.dequantize())
    assert set(parent.state_dict()) == {"proj." + n for n in stored_names(scheme)}
    with pytest.raises(RuntimeError, match="Missing key"):
        parent.load_state_dict({})
    again = QuantLinear.from_state(mod.stored_tensors())
    assert type(again) is type(mod) and torch.equal(again.dequantize(), mod.dequantize())


# --------------------------------------------------------------------------- kernel vs fallback

@needs_kernels
@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
@pytest.mark.parametrize("m", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("out,kin", [(37, 96), (192, 576), (5, 32), (130, 1024), (20, 2048)])
def test_kernel_matches_fallback(scheme, m, out, kin, monkeypatch):
    mod = quantize_weight(_w(out, kin, seed=m), scheme)
    x = torch.randn(m, kin, generator=torch.Generator().manual_seed(m + 1))
    y = mod(x)
    ref = _fallback(mod, x, monkeypatch)
    assert y.shape == ref.shape == (m, out) and y.dtype == torch.float32
    w = mod.dequantize()
    if m <= quant.DECODE_MAX_ROWS or mod.integer_prefill:
        # int8-activation kernel: tight check against a torch emulation ...
        xq = _quantize_act(x)
        emu = F.linear(xq, w)
        tol = 1e-5 * (xq.abs() @ w.abs().t()) + 1e-6
        assert bool(((y - emu).abs() <= tol).all()), float((y - emu).abs().max())
        # ... and a loose one against the float fallback: activation rounding error is at most
        # half a step (amax/254) per element.
        step = x.reshape(m, -1, 32).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(m, kin) / 254
        bound = step @ w.abs().t() + 1e-5
        assert bool(((y - ref).abs() <= bound).all())
    else:
        # prefill: dequantize (bit-exact) + float32 matmul
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
@pytest.mark.parametrize("out,kin", [(5, 32), (37, 96), (130, 1024), (9, 2048)])
def test_many_rows_bit_identical_to_one_row_at_a_time(scheme, out, kin):
    """The tile kernels (2 rows x tile for int8, 4 for int4, the rest one by one, activation
    rows in L2-sized chunks) give exactly what the one-row kernel gives for each row (whose int4
    tile folds the scales and mins into its block loop: one block, an odd and an even count).
    The avx512 path's VNNI GEMM (from ``vnni_gemm_min_rows`` rows on) sums in another order, but
    gives each row the same result whatever the rows batched with it."""
    mod = quantize_weight(_w(out, kin, seed=kin), scheme)
    k = kernels.get()
    x = torch.randn(203, kin, generator=torch.Generator().manual_seed(out))  # odd: every remainder path
    one_by_one = torch.cat([mod._kernel_matvec(k, x[i:i + 1].contiguous()) for i in range(x.shape[0])])
    gemm_from = getattr(k, "vnni_gemm_min_rows", None)
    all_rows = mod._kernel_matvec(k, x)
    for m in (2, 3, 4, 5, 7, 9, 16, 17, 18, 21, 203):
        got = mod._kernel_matvec(k, x[:m].contiguous())
        if gemm_from is None or m < gemm_from:
            assert torch.equal(got, one_by_one[:m]), m
        else:
            assert torch.equal(got, all_rows[:m]), m
            assert torch.equal(mod._kernel_matvec(k, x[-m:].contiguous()), all_rows[-m:]), m


@needs_kernels
def test_prefill_path_by_width():
    """Wide layers prefill through the int8 GEMM, narrow ones and float-activation heads dequantize."""
    wide, narrow = quantize_weight(_w(8, quant.GEMM_MIN_IN_FEATURES), "int4"), quantize_weight(_w(8, 64), "int8")
    assert wide.integer_prefill and not narrow.integer_prefill
    head = quantize_weight(_w(8, quant.GEMM_MIN_IN_FEATURES), "int8")
    head.float_activations = True
    assert not head.integer_prefill
    k = kernels.get()
    x = torch.randn(40, quant.GEMM_MIN_IN_FEATURES)
    assert torch.equal(wide(x), wide._kernel_matvec(k, x))
    assert torch.equal(head(x), head._prefill(k, x))


@needs_kernels
@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
def test_kernel_dequant_bit_exact(scheme):
    mod = quantize_weight(_w(37, 96), scheme)
    k = kernels.get()
    tiles = mod.qpack.shape[0]
    got = mod._kernel_dequant(k, 0, tiles)[:37]
    assert torch.equal(got, mod.dequantize())


@needs_kernels
@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
def test_kernel_input_layouts_and_dtypes(scheme, monkeypatch):
    mod = quantize_weight(_w(70, 128), scheme)
    base = torch.randn(3, 2, 256)
    x = base[..., ::2]  # non-contiguous [3, 2, 128]
    y = mod(x)
    assert y.shape == (3, 2, 70)
    torch.testing.assert_close(y, mod(x.contiguous()), rtol=0, atol=0)
    ref = _fallback(mod, x, monkeypatch)
    torch.testing.assert_close(y, ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))
    for dt in (torch.bfloat16, torch.float16):
        xb = x.to(dt)
        yb = mod(xb)
        assert yb.dtype == dt and yb.shape == (3, 2, 70)
        torch.testing.assert_close(yb, mod(xb.float()).to(dt), rtol=0, atol=0)
    # 1-D input and the large-M (prefill) path with a leading batch shape
    assert mod(x[0, 0]).shape == (70,)
    xl = torch.randn(2, 20, 128)
    torch.testing.assert_close(mod(xl), _fallback(mod, xl, monkeypatch), rtol=1e-4, atol=1e-5)


@needs_kernels
def test_kernel_respects_thread_count():
    mod = quantize_weight(_w(333, 256), "int4")
    x = torch.randn(1, 256)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = mod(x)
        torch.set_num_threads(2)
        y2 = mod(x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)  # rows are independent: identical regardless of threads


def test_prefill_tiling_matches(monkeypatch):
    mod = quantize_weight(_w(300, 64), "int8")
    monkeypatch.setattr(quant, "PREFILL_TILE_BYTES", 4 * 64 * 4 * 16)  # 16 tiles = 64 rows per chunk
    x = torch.randn(20, 64)
    y = mod(x)
    ref = F.linear(x, mod.dequantize())
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- GGUF import

@pytest.mark.parametrize("qtype", [GT.Q8_0, GT.Q4_0, GT.Q4_1])
@pytest.mark.parametrize("out,kin", [(5, 32), (37, 96), (64, 576)])
def test_gguf_import_bit_exact(qtype, out, kin):
    rng = np.random.default_rng(out * kin)
    w = (rng.standard_normal((out, kin)) * 0.05).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)  # uint8 [out, bytes_per_row], as GGUFReader gives it
    assert raw.dtype == np.uint8 and raw.shape[0] == out
    mod = from_gguf_blocks(raw, qtype, (out, kin))
    assert isinstance(mod, Int8Linear if qtype == GT.Q8_0 else Int4Linear)
    expect = gguf.quants.dequantize(raw, qtype).reshape(out, kin).astype(np.float32)
    assert np.array_equal(mod.dequantize().numpy(), expect)
    if qtype == GT.Q4_1:  # same nibble order: qweight is a pure copy of the block payload
        payload = raw.reshape(out, kin // 32, 20)[:, :, 4:].reshape(out, kin // 2)
        assert np.array_equal(mod.stored_tensors()["qweight"].numpy(), payload)


def test_gguf_import_rejects_other_types():
    raw = gguf.quants.quantize(np.zeros((4, 32), np.float32), GT.F16).view(np.uint8)
    with pytest.raises(ValueError, match="F16"):
        from_gguf_blocks(raw, GT.F16, (4, 32))
    with pytest.raises(ValueError, match="Q6_K"):
        from_gguf_blocks(np.zeros((4, 210), np.uint8), GT.Q6_K, (4, 256))
    raw = gguf.quants.quantize(np.zeros((4, 64), np.float32), GT.Q8_0)
    with pytest.raises(ValueError, match="bytes"):
        from_gguf_blocks(raw, GT.Q8_0, (4, 96))
    with pytest.raises(ValueError, match="multiple of 32"):
        from_gguf_blocks(raw, GT.Q8_0, (4, 48))


# --------------------------------------------------------------------------- sharding / fusing

@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
def test_row_and_column_split_of_stored_tensors(scheme):
    out, kin = 37, 192
    w = _w(out, kin, seed=3)
    st = quantize_weight(w, scheme).stored_tensors()
    per_in = {"qweight": 1 if scheme == "int8" else 2, "scales": 32, "mins": 32}
    # row split: slice dim 0 of every tensor
    for r0, r1 in [(0, 20), (20, 37)]:
        part = QuantLinear.from_state({n: t[r0:r1] for n, t in st.items()})
        expect = quantize_weight(w[r0:r1], scheme)
        for n, t in expect.stored_tensors().items():
            assert torch.equal(part.stored_tensors()[n], t)
    # column split at multiples of 32 input features
    for c0, c1 in [(0, 64), (64, 192)]:
        part = QuantLinear.from_state({n: t[:, c0 // per_in[n]:c1 // per_in[n]] for n, t in st.items()})
        expect = quantize_weight(w[:, c0:c1], scheme)
        assert part.in_features == c1 - c0
        for n, t in expect.stored_tensors().items():
            assert torch.equal(part.stored_tensors()[n], t)


@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
def test_cat_rows(scheme):
    ws = [_w(n, 96, seed=n) for n in (5, 8, 13)]
    fused = cat_rows([quantize_weight(w, scheme) for w in ws])
    whole = quantize_weight(torch.cat(ws), scheme)
    assert fused.out_features == 26 and type(fused) is type(whole)
    for n, t in whole.stored_tensors().items():
        assert torch.equal(fused.stored_tensors()[n], t)
    x = torch.randn(2, 96)
    torch.testing.assert_close(fused(x), whole(x), rtol=0, atol=0)


def test_cat_rows_rejects_mismatch():
    with pytest.raises(ValueError, match="schemes"):
        cat_rows([quantize_weight(_w(4, 32), "int8"), quantize_weight(_w(4, 32), "int4")])
    with pytest.raises(ValueError, match="in_features"):
        cat_rows([quantize_weight(_w(4, 32), "int8"), quantize_weight(_w(4, 64), "int8")])
    with pytest.raises(ValueError, match="at least one"):
        cat_rows([])


# --------------------------------------------------------------------------- validation

def test_bad_inputs():
    with pytest.raises(ValueError, match=r"'int3'.*int8.*int4"):
        quantize_weight(_w(4, 32), "int3")
    with pytest.raises(ValueError, match="int3"):
        stored_names("int3")
    with pytest.raises(ValueError, match="in_features=48.*multiple of 32"):
        quantize_weight(torch.randn(4, 48), "int8")
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.randn(4, 4, 32), "int4")
    with pytest.raises(ValueError, match="floating point"):
        quantize_weight(torch.ones(4, 32, dtype=torch.int32), "int8")
    with pytest.raises(ValueError, match="scales"):
        Int8Linear(torch.zeros(4, 64, dtype=torch.int8), torch.zeros(4, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="uint8"):
        Int4Linear(torch.zeros(4, 32, dtype=torch.int8), torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="missing.*mins"):
        Int4Linear.from_state({"qweight": torch.zeros(4, 16, dtype=torch.uint8), "scales": torch.zeros(4, 1)})
    mod = quantize_weight(_w(4, 32), "int8")
    with pytest.raises(ValueError, match="in_features=32"):
        mod(torch.randn(2, 64))


def test_float32_scales_accepted():
    mod = quantize_weight(_w(6, 64), "int4")
    st = {n: (t.float() if n != "qweight" else t) for n, t in mod.stored_tensors().items()}
    mod32 = QuantLinear.from_state(st)
    assert mod32.stored_tensors()["scales"].dtype == torch.float32
    assert torch.equal(mod32.dequantize(), mod.dequantize())
    x = torch.randn(1, 64)
    torch.testing.assert_close(mod32(x), mod(x), rtol=0, atol=0)


@needs_kernels
def test_bench_matvec_smoke():
    from tpllama.bench.kernels import bench_matvec

    r = bench_matvec(64, 128, "int8", threads=1, min_time=0.01, probe_bytes=1 << 22)
    assert r["gbps"] > 0 and r["probe_gbps"] > 0 and r["kernel"]


@needs_kernels
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("out,kin", [(37, 96), (130, 576)])
def test_float_activation_kernel_is_exact(m, out, kin, monkeypatch):
    """float_activations (the lm_head): int8 weights times float32 activations, no activation
    rounding, so it matches the float fallback to float32 summation error."""
    mod = quantize_weight(_w(out, kin, seed=out), "int8")
    mod.float_activations = True
    x = torch.randn(m, kin, generator=torch.Generator().manual_seed(m))
    got = mod(x)
    torch.testing.assert_close(got, _fallback(mod, x, monkeypatch), rtol=1e-5, atol=1e-5)
    mod.float_activations = False  # the int8-activation kernel is measurably further off
    assert (mod(x) - got).abs().max() > 1e-4
