"""The kernel paths (avx2, avx512): choosing one at run time, forcing a narrower one, building
every one on any x86-64 machine, and bit-identical results from every path this CPU runs."""

import os

import pytest
import torch
import torch.nn.functional as F

from tpllama import kernels
from tpllama.model import quant
from tpllama.model.quant import quantize_weight

from helpers import make_tiny_hf, quantize_activations, random_weight

PATHS = kernels.runnable_paths()
needs_kernels = pytest.mark.skipif(not PATHS, reason="the CPU kernels cannot run on this CPU")


def test_paths_from_cpu_features(monkeypatch):
    """The widest path whose features the CPU has; TPLLAMA_KERNEL_PATH picks a narrower one and is
    refused, naming what is allowed, when unknown or when the CPU lacks it."""
    monkeypatch.delenv("TPLLAMA_KERNEL_PATH", raising=False)
    monkeypatch.delenv("TPLLAMA_NO_KERNELS", raising=False)
    have = kernels.cpu_features()
    for path in PATHS:
        assert set(kernels.KERNEL_PATHS[path][0]) <= have
    assert kernels.kernel_path() == (PATHS[-1] if PATHS else None)
    if not PATHS:
        return
    monkeypatch.setenv("TPLLAMA_KERNEL_PATH", "avx2")
    assert kernels.kernel_path() == "avx2"
    assert kernels.get().kernel_path() == "avx2" and kernels.isa().startswith("avx2 forced (")
    monkeypatch.setenv("TPLLAMA_KERNEL_PATH", "sse2")
    with pytest.raises(ValueError, match=r"'sse2' is not a kernel path; expected one of \['avx2', 'avx512'\]"):
        kernels.kernel_path()
    if "avx512" not in PATHS:
        monkeypatch.setenv("TPLLAMA_KERNEL_PATH", "avx512")
        with pytest.raises(ValueError, match="this CPU lacks .*avx512"):
            kernels.kernel_path()
    monkeypatch.setenv("TPLLAMA_NO_KERNELS", "1")
    assert kernels.kernel_path() is None and kernels.get() is None


def test_every_path_builds_here():
    """Every path compiles on any x86-64 machine (the avx512 one too where the CPU cannot run it:
    the compiler does not need the CPU), so a change that breaks one path fails here."""
    if not kernels.cpu_supported()[0]:
        pytest.skip("not an x86-64 CPU with AVX2: the kernels are not built here")
    for path in kernels.KERNEL_PATHS:
        library = kernels.build_compute(path, load=False)
        assert os.path.getsize(library) > 0, path


@needs_kernels
def test_a_failed_wide_build_falls_back_to_avx2(monkeypatch):
    """When the avx512 build cannot be used (its build failed), get() returns the avx2 module."""

    class Failed:
        def get(self):
            return None

    monkeypatch.delenv("TPLLAMA_KERNEL_PATH", raising=False)
    monkeypatch.setattr(kernels, "runnable_paths", lambda: ("avx2", "avx512"))
    monkeypatch.setitem(kernels._COMPUTE, "avx512", Failed())
    assert kernels.kernel_path() == "avx512"
    assert kernels.get() is kernels.compute("avx2") and kernels.get().kernel_path() == "avx2"


@needs_kernels
@pytest.mark.parametrize("path", PATHS)
def test_each_path_is_what_it_says(path):
    assert kernels.compute(path).kernel_path() == path


def _emulated(x, mod):
    """The kernels' arithmetic in torch: activations rounded to int8 per 32-block, then float."""
    xq = quantize_activations(x)
    w = mod.dequantize()
    return F.linear(xq, w), 1e-5 * (xq.abs() @ w.abs().t()) + 1e-6


@needs_kernels
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scheme", quant.QUANT_SCHEMES)
def test_each_path_matches_the_reference(path, scheme):
    """Decode rows (1, 2, 3) and GEMM rows (5, 64, 203: every remainder of the 2-row int8 and 4-row
    int4 tiles) against the torch emulation, on odd and even block counts."""
    k = kernels.compute(path)
    for out, kin in [(5, 32), (37, 96), (130, 1024), (9, 2048)]:
        mod = quantize_weight(random_weight(out, kin, out), scheme)
        for m in (1, 2, 3, 5, 64, 203):
            x = torch.randn(m, kin, generator=torch.Generator().manual_seed(m))
            y = mod._kernel_matvec(k, x)
            ref, tol = _emulated(x, mod)
            assert bool(((y - ref).abs() <= tol).all()), (path, out, kin, m, float((y - ref).abs().max()))


@pytest.mark.skipif(len(PATHS) < 2, reason="this CPU runs one kernel path only (avx2): nothing to compare it with")
@pytest.mark.parametrize("scheme", quant.QUANT_SCHEMES)
def test_paths_bit_identical(scheme):
    """Every wider path gives exactly the avx2 path's floats for decode batches (up to 16 rows),
    with float16 and float32 scales; its GEMM (more rows) is checked against the reference above."""
    narrow = kernels.compute("avx2")
    for path in PATHS[1:]:
        wide = kernels.compute(path)
        for out, kin in [(5, 32), (37, 96), (576, 576), (130, 1024), (9, 2048)]:
            for scale_dtype in (torch.float16, torch.float32):
                mod = quantize_weight(random_weight(out, kin, kin), scheme)
                if scale_dtype == torch.float32:
                    mod = type(mod).from_state({n: t.float() if t.is_floating_point() else t
                                                for n, t in mod.stored_tensors().items()})
                for m in (1, 2, 3, 4, 5, 9, quant.DECODE_MAX_ROWS):
                    x = torch.randn(m, kin, generator=torch.Generator().manual_seed(m + out))
                    assert torch.equal(mod._kernel_matvec(narrow, x), mod._kernel_matvec(wide, x)), (path, out, kin, m)


@pytest.mark.skipif(len(PATHS) < 2, reason="this CPU runs one kernel path only (avx2): nothing to compare it with")
@pytest.mark.parametrize("scheme", quant.QUANT_SCHEMES)
def test_forced_path_same_greedy_tokens(tmp_path, scheme, monkeypatch):
    """A whole quantized model (fused decode blocks, batched rows) generates the same tokens on
    the avx2 path as on the CPU's widest."""
    import tpllama

    model_dir = make_tiny_hf(tmp_path, "q32", seed=2)
    ids = torch.randint(3, 140, (2, 24), generator=torch.Generator().manual_seed(4))
    out = {}
    for path in ("avx2", PATHS[-1]):
        monkeypatch.setenv("TPLLAMA_KERNEL_PATH", path)
        with tpllama.load(model_dir, quant=scheme) as engine:
            out[path] = engine.generate(ids, max_new_tokens=20, ignore_eos=True)
    assert torch.equal(out["avx2"], out[PATHS[-1]])
