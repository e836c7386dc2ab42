"""Weight-only quantized linear layers (block size 32 along the input dimension, like GGUF).

Schemes
-------
``int8``  symmetric per block of 32 input features (GGUF Q8_0 semantics, ``w = d * q``)::

    qweight  int8          [out, in]
    scales   float16|32    [out, in // 32]

``int4``  asymmetric per block of 32 (GGUF Q4_1 semantics, ``w = d * q + m``, ``q`` in 0..15)::

    qweight  uint8         [out, in // 2]   packed nibbles, GGUF order: inside each block of
                                            32 inputs (16 bytes), byte j holds element j in
                                            its low nibble and element j + 16 in its high nibble
    scales   float16|32    [out, in // 32]
    mins     float16|32    [out, in // 32]

GGUF Q4_0 (``w = d * (q - 8)``) is imported as ``m = -8 d`` (exact).

The stored tensors (``stored_tensors()`` / ``state_dict()``) keep output features in dim 0 and
input features (or blocks of them) in dim 1, so a tensor-parallel sharder can slice them
generically: a row split slices dim 0 of every tensor; a column split slices dim 1 at a
multiple of 32 input features (``qweight`` of int8 at that index, ``qweight`` of int4 at
index / 2, ``scales``/``mins`` at index / 32).

In memory a module keeps only a repacked form, made at construction: output rows interleaved in
tiles of 4 per 32-block (buffers ``qpack``/``spack``/``mpack``, not persistent, zero rows pad the
last tile) so that the matrix-vector kernel reads one linear stream. ``state_dict()`` and
``stored_tensors()`` unpack on the fly (a copy), and ``load_state_dict`` accepts the stored form.

``forward`` runs on any device. On CPU with the C++ kernels (``tpllama.kernels``) it quantizes
the activations to int8 per row and 32-block and multiplies them with the int8/int4 weights in
integers: always for at most ``DECODE_MAX_ROWS`` rows (decode), and for more rows (prefill: an
int8 GEMM, several activation rows per weight tile) when ``in_features >= GEMM_MIN_IN_FEATURES``.
Narrower layers, and layers whose activations must stay float (``float_activations``: the
lm_head), dequantize the weight (in row tiles) to float32 for torch's matmul when prefilling.
Everywhere else (CUDA, no kernels, ``TPLLAMA_NO_KERNELS=1``) it uses the pure-PyTorch reference:
``F.linear(x, dequantize())``. Computation is float32; the result has the dtype of ``x``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import kernels as _kernels
from ..config import QUANT_SCHEMES

__all__ = [
    "QUANT_SCHEMES", "BLOCK", "QuantLinear", "Int8Linear", "Int4Linear", "quantize_weight",
    "from_gguf_blocks", "cat_rows", "stored_names", "DECODE_MAX_ROWS", "GEMM_MIN_IN_FEATURES",
]

BLOCK = 32

# Activation row counts up to this always use the int8-activation kernel (on this AVX2 box it
# won over dequantize + float32 matmul at M=16-32 for every shape).
DECODE_MAX_ROWS = 16
# Above DECODE_MAX_ROWS, layers at least this wide use the int8-activation kernel too. Measured
# on Zen 3 (2 threads, python -m tpllama.bench.kernels --gemm ...): int8 1.2-3.0x and int4
# 1.2-2.7x faster than dequantize + sgemm for in_features 2048-6912 at M = 128 (LLaMA-13B and
# TinyLlama shapes), 1.0-1.1x at 1536, 0.8-1.0x at 576. SmolLM2 (576 and 1536 wide) keeps the
# float prefill: nothing to gain there, and its greedy answers stay what they were.
GEMM_MIN_IN_FEATURES = 2048
# Prefill path: dequantize at most this many float32 bytes of weight at a time.
PREFILL_TILE_BYTES = 32 << 20

_SCALE_DTYPES = (torch.float16, torch.float32)


def _check_scheme(scheme) -> str:
    if scheme not in QUANT_SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {QUANT_SCHEMES}")
    return scheme


def stored_names(scheme: str) -> tuple[str, ...]:
    """Names of the stored tensors of a scheme (state_dict keys without prefix)."""
    _check_scheme(scheme)
    return ("qweight", "scales") if scheme == "int8" else ("qweight", "scales", "mins")


def _check_in_features(in_features: int, what: str = "in_features") -> None:
    if in_features <= 0 or in_features % BLOCK:
        raise ValueError(f"{what}={in_features} must be a positive multiple of {BLOCK} for block quantization")


def _check_weight(weight) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating point tensor, got {weight.dtype}")
    if weight.shape[0] <= 0:
        raise ValueError(f"weight must have at least one output row, got shape {tuple(weight.shape)}")
    _check_in_features(weight.shape[1])
    return weight


def _unpack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] (GGUF nibble order) -> uint8 [out, in] with values 0..15."""
    out, half = qweight.shape
    q = qweight.reshape(out, half // 16, 16)
    return torch.cat([q & 0x0F, q >> 4], dim=-1).reshape(out, half * 2)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] values 0..15 -> uint8 [out, in/2] (GGUF nibble order)."""
    out, n = q.shape
    q = q.reshape(out, n // BLOCK, 2, 16)
    return (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(out, n // 2)


TILE = 4  # output rows per in-memory tile (kernel layout)


def _pack_rows(t: torch.Tensor) -> torch.Tensor:
    """Stored [out, nb * e] -> in-memory tiles [ceil(out/4), nb, 4, e] (zero rows pad the last tile).

    ``t`` is viewed as [out, nb, e] blocks with ``e`` = elements per 32-block (32 int8, 16 nibble bytes,
    1 scale); the caller passes the reshaped [out, nb, e] tensor.
    """
    out, nb, e = t.shape
    tiles = -(-out // TILE)
    pad = tiles * TILE - out
    if pad:
        t = torch.cat([t, t.new_zeros(pad, nb, e)], dim=0)
    return t.reshape(tiles, TILE, nb, e).permute(0, 2, 1, 3).contiguous()


def _unpack_rows(p: torch.Tensor, out: int) -> torch.Tensor:
    """Inverse of _pack_rows: [tiles, nb, 4, e] -> [out, nb, e] (contiguous)."""
    tiles, nb, _, e = p.shape
    return p.permute(0, 2, 1, 3).reshape(tiles * TILE, nb, e)[:out].contiguous()


class QuantLinear(torch.nn.Module):
    """Base class of the weight-only quantized linear layers (no bias).

    In memory the tensors are kept in a kernel-friendly tiled layout (buffers ``qpack``, ``spack``
    [, ``mpack``], non-persistent); ``stored_tensors()`` and ``state_dict()`` give (and
    ``load_state_dict`` accepts) the stored form described in the module docs.
    """

    scheme: str = ""
    in_features: int
    out_features: int

    def __init__(self, stored: dict):
        super().__init__()
        q = stored["qweight"]
        self.out_features = int(q.shape[0])
        self.in_features = int(q.shape[1]) * (2 if self.scheme == "int4" else 1)
        self._set_stored(stored)
        self.register_state_dict_post_hook(QuantLinear._state_dict_hook)
        self.register_load_state_dict_pre_hook(QuantLinear._load_hook)

    # -- stored <-> in-memory ---------------------------------------------------------------
    def _set_stored(self, stored: dict) -> None:
        out, nb = self.out_features, self.in_features // BLOCK
        q = stored["qweight"].reshape(out, nb, -1)
        self.register_buffer("qpack", _pack_rows(q), persistent=False)
        self.register_buffer("spack", _pack_rows(stored["scales"].reshape(out, nb, 1)).squeeze(-1),
                             persistent=False)
        if "mins" in stored:
            self.register_buffer("mpack", _pack_rows(stored["mins"].reshape(out, nb, 1)).squeeze(-1),
                                 persistent=False)

    def stored_tensors(self) -> dict:
        """The stored form (see module docs); names without prefix. Freshly unpacked copies."""
        out, kin = self.out_features, self.in_features
        res = {"qweight": _unpack_rows(self.qpack, out).reshape(out, -1),
               "scales": _unpack_rows(self.spack.unsqueeze(-1), out).reshape(out, kin // BLOCK)}
        if self.scheme == "int4":
            res["mins"] = _unpack_rows(self.mpack.unsqueeze(-1), out).reshape(out, kin // BLOCK)
        return res

    @property
    def scales_dtype(self) -> torch.dtype:
        return self.spack.dtype

    @staticmethod
    def _state_dict_hook(module, state_dict, prefix, local_metadata):
        for name, t in module.stored_tensors().items():
            state_dict[prefix + name] = t

    @staticmethod
    def _load_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                   error_msgs):
        names = stored_names(module.scheme)
        present = [n for n in names if prefix + n in state_dict]
        if not present:
            missing_keys.extend(prefix + n for n in names)
            return
        if len(present) != len(names):
            missing_keys.extend(prefix + n for n in names if n not in present)
            for n in present:
                state_dict.pop(prefix + n)
            return
        tensors = {n: state_dict.pop(prefix + n) for n in names}
        try:
            new = type(module).from_state(tensors)
        except ValueError as e:
            error_msgs.append(f"{prefix}: {e}")
            return
        if (new.out_features, new.in_features) != (module.out_features, module.in_features):
            error_msgs.append(f"{prefix}: shape mismatch, stored tensors are for [{new.out_features}, "
                              f"{new.in_features}], module is [{module.out_features}, {module.in_features}]")
            return
        dev = module.qpack.device
        for name, buf in new.named_buffers(recurse=False):
            module.register_buffer(name, buf.to(dev), persistent=False)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "QuantLinear":
        if cls is QuantLinear:
            raise ValueError("QuantLinear.from_float needs a scheme: use quantize_weight(weight, scheme) "
                             "or Int8Linear/Int4Linear.from_float")
        return cls._quantize(_check_weight(weight))

    @classmethod
    def from_state(cls, tensors: dict) -> "QuantLinear":
        """Inverse of ``stored_tensors()``. On the base class the scheme is inferred from the names."""
        if not isinstance(tensors, dict):
            raise ValueError(f"from_state expects a dict of tensors, got {type(tensors).__name__}")
        if cls is QuantLinear:
            cls = Int4Linear if "mins" in tensors else Int8Linear
        names = stored_names(cls.scheme)
        missing = [n for n in names if n not in tensors]
        extra = [n for n in tensors if n not in names]
        if missing or extra:
            raise ValueError(f"{cls.__name__}.from_state: expected tensors {names}, "
                             f"missing {missing}, unexpected {extra}")
        return cls(*(tensors[n] for n in names))

    # -- compute ------------------------------------------------------------------------------
    def dequantize(self) -> torch.Tensor:
        """float32 [out, in] (pure PyTorch, any device)."""
        w = self._dequant_tiles(self.qpack, self.spack, getattr(self, "mpack", None))
        return w[: self.out_features]

    def _dequant_tiles(self, q, s, m) -> torch.Tensor:  # -> float32 [tiles*4, in]
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kin = self.in_features
        if x.shape[-1] != kin:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, "
                             f"expected in_features={kin}")
        k = _kernels.get() if x.is_cpu else None
        if k is not None and x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] <= DECODE_MAX_ROWS \
                and x.is_contiguous() and self._buffers["qpack"].is_cpu:
            return self._kernel_matvec(k, x)  # fast path: decode step, nothing to convert
        out_dtype = x.dtype if x.is_floating_point() else torch.float32
        lead = x.shape[:-1]
        x2 = x.reshape(-1, kin).to(torch.float32)
        if k is None or not self.qpack.is_cpu:
            y = F.linear(x2, self.dequantize().to(x2.device))
        elif x2.shape[0] <= DECODE_MAX_ROWS or self.integer_prefill:
            y = self._kernel_matvec(k, x2.contiguous())
        else:
            y = self._prefill(k, x2.contiguous())
        return y.to(out_dtype).reshape(*lead, self.out_features)

    # True on layers whose activations must not be rounded to int8 (the lm_head): the decode
    # kernel then multiplies the int8 weights with the float32 activations.
    float_activations = False

    @property
    def integer_prefill(self) -> bool:
        """Whether many activation rows go through the int8 GEMM rather than dequantize + sgemm."""
        return not self.float_activations and self.in_features >= GEMM_MIN_IN_FEATURES

    def _prefill(self, k, xf: torch.Tensor) -> torch.Tensor:
        n, kin = self.out_features, self.in_features
        tiles = self.qpack.shape[0]
        step = max(16, PREFILL_TILE_BYTES // (4 * kin * TILE))  # tiles per chunk
        if step >= tiles:
            return F.linear(xf, self._kernel_dequant(k, 0, tiles)[:n])
        y = torch.empty(xf.shape[0], n, dtype=torch.float32)
        for t0 in range(0, tiles, step):
            t1 = min(tiles, t0 + step)
            r0, r1 = t0 * TILE, min(n, t1 * TILE)
            y[:, r0:r1] = F.linear(xf, self._kernel_dequant(k, t0, t1)[: r1 - r0])
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
                f"scale_dtype={self.spack.dtype}")


class Int8Linear(QuantLinear):
    scheme = "int8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(f"int8 qweight must be a 2-D int8 tensor [out, in], got "
                             f"{getattr(qweight, 'dtype', type(qweight).__name__)} "
                             f"{tuple(getattr(qweight, 'shape', ()))}")
        out, kin = qweight.shape
        if out <= 0:
            raise ValueError(f"int8 qweight must have at least one row, got shape {tuple(qweight.shape)}")
        _check_in_features(kin, "in_features (qweight.shape[1])")
        if not isinstance(scales, torch.Tensor) or scales.dtype not in _SCALE_DTYPES:
            raise ValueError(f"int8 scales must be float16 or float32, got {getattr(scales, 'dtype', scales)}")
        if tuple(scales.shape) != (out, kin // BLOCK):
            raise ValueError(f"int8 scales must have shape {(out, kin // BLOCK)}, got {tuple(scales.shape)}")
        if scales.device != qweight.device:
            raise ValueError(f"int8 qweight and scales are on different devices ({qweight.device}, {scales.device})")
        super().__init__({"qweight": qweight, "scales": scales})

    @classmethod
    def _quantize(cls, weight: torch.Tensor) -> "Int8Linear":
        out, kin = weight.shape
        w = weight.detach().to(torch.float32).reshape(out, kin // BLOCK, BLOCK)
        amax = w.abs().amax(dim=-1)
        scales = (amax / 127.0).to(torch.float16)
        d = scales.to(torch.float32)
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.round(w * inv.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
        return cls(q.reshape(out, kin), scales)

    def _dequant_tiles(self, q, s, m):
        tiles, nb = q.shape[0], q.shape[1]
        w = q.to(torch.float32) * s.to(torch.float32).unsqueeze(-1)  # [tiles, nb, 4, 32]
        return w.permute(0, 2, 1, 3).reshape(tiles * TILE, nb * BLOCK)

    def _kernel_matvec(self, k, x):
        b = self._buffers
        matvec = k.q8f_matvec if self.float_activations else k.q8_matvec
        return matvec(x, b["qpack"], b["spack"], self.out_features)

    def _kernel_dequant(self, k, t0, t1):
        return k.q8_dequant(self.qpack[t0:t1], self.spack[t0:t1])


class Int4Linear(QuantLinear):
    scheme = "int4"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor):
        if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 2:
            raise ValueError(f"int4 qweight must be a 2-D uint8 tensor [out, in // 2] of packed nibbles, got "
                             f"{getattr(qweight, 'dtype', type(qweight).__name__)} "
                             f"{tuple(getattr(qweight, 'shape', ()))}")
        out, half = qweight.shape
        if out <= 0:
            raise ValueError(f"int4 qweight must have at least one row, got shape {tuple(qweight.shape)}")
        kin = half * 2
        _check_in_features(kin, "in_features (2 * qweight.shape[1])")
        for name, t in (("scales", scales), ("mins", mins)):
            if not isinstance(t, torch.Tensor) or t.dtype not in _SCALE_DTYPES:
                raise ValueError(f"int4 {name} must be float16 or float32, got {getattr(t, 'dtype', t)}")
            if tuple(t.shape) != (out, kin // BLOCK):
                raise ValueError(f"int4 {name} must have shape {(out, kin // BLOCK)}, got {tuple(t.shape)}")
            if t.device != qweight.device:
                raise ValueError(f"int4 qweight and {name} are on different devices ({qweight.device}, {t.device})")
        if scales.dtype != mins.dtype:  # keep one dtype for the kernels
            scales, mins = scales.to(torch.float32), mins.to(torch.float32)
        super().__init__({"qweight": qweight, "scales": scales, "mins": mins})

    @classmethod
    def _quantize(cls, weight: torch.Tensor) -> "Int4Linear":
        out, kin = weight.shape
        w = weight.detach().to(torch.float32).reshape(out, kin // BLOCK, BLOCK)
        wmin = w.amin(dim=-1)
        wmax = w.amax(dim=-1)
        scales = ((wmax - wmin) / 15.0).to(torch.float16)
        mins = wmin.to(torch.float16)
        d = scales.to(torch.float32)
        m = mins.to(torch.float32)
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.round((w - m.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)
        return cls(_pack_nibbles(q.reshape(out, kin)), scales, mins)

    def _dequant_tiles(self, q, s, m):
        tiles, nb = q.shape[0], q.shape[1]
        qq = torch.cat([q & 0x0F, q >> 4], dim=-1).to(torch.float32)  # [tiles, nb, 4, 32]
        w = qq * s.to(torch.float32).unsqueeze(-1) + m.to(torch.float32).unsqueeze(-1)
        return w.permute(0, 2, 1, 3).reshape(tiles * TILE, nb * BLOCK)

    def _kernel_matvec(self, k, x):
        b = self._buffers
        return k.q4_matvec(x, b["qpack"], b["spack"], b["mpack"], self.out_features)

    def _kernel_dequant(self, k, t0, t1):
        return k.q4_dequant(self.qpack[t0:t1], self.spack[t0:t1], self.mpack[t0:t1])


_CLASSES = {"int8": Int8Linear, "int4": Int4Linear}


def quantize_weight(weight: torch.Tensor, scheme: str) -> QuantLinear:
    """Quantize a float weight [out, in] (in % 32 == 0) with ``scheme`` in QUANT_SCHEMES."""
    return _CLASSES[_check_scheme(scheme)].from_float(weight)


def cat_rows(modules: Sequence[QuantLinear]) -> QuantLinear:
    """Concatenate quantized layers along the output dimension (e.g. fuse q,k,v or gate,up)."""
    modules = list(modules)
    if not modules:
        raise ValueError("cat_rows needs at least one module")
    for i, mod in enumerate(modules):
        if not isinstance(mod, QuantLinear):
            raise ValueError(f"cat_rows: modules[{i}] is {type(mod).__name__}, not a QuantLinear")
    schemes = {mod.scheme for mod in modules}
    if len(schemes) != 1:
        raise ValueError(f"cat_rows: modules have different schemes {sorted(schemes)}")
    ins = {mod.in_features for mod in modules}
    if len(ins) != 1:
        raise ValueError(f"cat_rows: modules have different in_features {sorted(ins)}")
    devices = {str(mod.qpack.device) for mod in modules}
    if len(devices) != 1:
        raise ValueError(f"cat_rows: modules are on different devices {sorted(devices)}")
    cls = type(modules[0])
    names = stored_names(cls.scheme)
    parts = [mod.stored_tensors() for mod in modules]
    out = {}
    for n in names:
        ts = [p[n] for p in parts]
        if n != "qweight" and len({t.dtype for t in ts}) > 1:
            ts = [t.to(torch.float32) for t in ts]
        out[n] = torch.cat(ts, dim=0)
    return cls.from_state(out)


def from_gguf_blocks(raw, ggml_type, shape_out_in: tuple) -> QuantLinear:
    """Wrap GGUF quantized blocks without a float detour.

    ``raw``: the uint8 array a GGUF reader gives for the tensor (``[rows, bytes_per_row]``,
    any shape with the right number of bytes is accepted); ``shape_out_in``: (out, in).
    Q8_0 -> Int8Linear (float16 scales), Q4_0 / Q4_1 -> Int4Linear (float16 scales and mins;
    float32 if ``-8 d`` of a Q4_0 block overflows float16). Other types raise ValueError.
    """
    import gguf

    try:
        qt = gguf.GGMLQuantizationType(ggml_type)
    except ValueError:
        raise ValueError(f"unknown GGML quantization type {ggml_type!r}") from None
    supported = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1)
    if qt not in supported:
        raise ValueError(f"GGML type {qt.name} is not supported by tpllama.quant "
                         f"(supported: {', '.join(t.name for t in supported)}); dequantize it to float instead")
    try:
        out, kin = (int(v) for v in shape_out_in)
    except (TypeError, ValueError):
        raise ValueError(f"shape_out_in must be (out, in), got {shape_out_in!r}") from None
    if out <= 0:
        raise ValueError(f"shape_out_in={shape_out_in!r}: out must be positive")
    _check_in_features(kin, f"in ({qt.name} tensor of shape_out_in={tuple(shape_out_in)})")
    block_size, type_size = gguf.GGML_QUANT_SIZES[qt]
    assert block_size == BLOCK
    nb = kin // BLOCK
    a = np.asarray(raw)
    if a.dtype != np.uint8:
        raise ValueError(f"raw {qt.name} blocks must be a uint8 array, got {a.dtype}")
    if a.size != out * nb * type_size:
        raise ValueError(f"raw {qt.name} data has {a.size} bytes, expected {out * nb * type_size} "
                         f"for shape_out_in={(out, kin)}")
    blocks = np.ascontiguousarray(a).reshape(out, nb, type_size)

    def f16(col):  # [out, nb] float16 from two bytes per block
        return torch.from_numpy(np.ascontiguousarray(blocks[:, :, col:col + 2]).view(np.float16).reshape(out, nb))

    if qt == gguf.GGMLQuantizationType.Q8_0:
        q = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(out, kin)
        return Int8Linear(torch.from_numpy(q), f16(0))
    if qt == gguf.GGMLQuantizationType.Q4_1:
        q = np.ascontiguousarray(blocks[:, :, 4:]).reshape(out, kin // 2)
        return Int4Linear(torch.from_numpy(q), f16(0), f16(2))
    # Q4_0: w = d * (q - 8) = d * q + (-8 d); -8 d is exact in float16 unless it overflows
    q = np.ascontiguousarray(blocks[:, :, 2:]).reshape(out, kin // 2)
    d = f16(0)
    m = d * -8
    if not torch.isfinite(m).all() and torch.isfinite(d).all():
        d = d.to(torch.float32)
        m = d * -8
    return Int4Linear(torch.from_numpy(q), d, m)
