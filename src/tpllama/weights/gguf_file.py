"""A GGUF file's metadata and tensor table, read without materialising its vocabulary.

The ``gguf`` package's reader builds a numpy view for every field item when it opens a file: for
a 49k-token vocabulary that is 98k strings and a million memmap views, seconds before the first
weight is read. Here the header is walked once with ``struct`` (an array is skipped by its byte
length; only the scalars are decoded, and an array's length is kept), and each tensor is a
memory-mapped numpy view shaped as the ``gguf`` reader shapes it: ``[rows, columns]`` for float
tensors, ``[rows, bytes per row]`` of uint8 for block-quantized ones. The tokenizer comes from the
``tokenizer.json`` converted once into the cache.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np

# GGUF value types -> struct format of one scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """Not a GGUF file, or a truncated or damaged one."""


@dataclasses.dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # as in the file: the fastest-moving dimension first
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray  # memory-mapped, shaped like the gguf reader's


class GGUFFile:
    """``fields``: every scalar key/value, and the length of every array; ``tensors``: the table."""

    def __init__(self, path: str | Path):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        buf = memoryview(self._map)
        self._buf, self._pos = buf, 0
        try:
            if bytes(buf[:4]) != b"GGUF":
                raise GGUFFormatError(f"magic bytes {bytes(buf[:4])!r}, expected b'GGUF'")
            self._pos = 4
            (version,) = self._take("<I")
            if version not in (2, 3):
                raise GGUFFormatError(f"GGUF version {version} (supported: 2, 3)")
            n_tensors, n_kv = self._take("<QQ")
            self.fields: dict = {}
            for _ in range(n_kv):
                key = self._string()
                (vtype,) = self._take("<I")
                self.fields[key] = self._value(vtype)
            infos = []
            for _ in range(n_tensors):
                name = self._string()
                (n_dims,) = self._take("<I")
                dims = self._take(f"<{n_dims}Q")
                ttype, offset = self._take("<IQ")
                infos.append((name, tuple(int(d) for d in dims), ttype, offset))
            align = int(self.fields.get("general.alignment", 32))
            start = -(-self._pos // align) * align
            self.tensors: list[GGUFTensor] = []
            for name, dims, ttype, offset in infos:
                qtype = GGMLQuantizationType(ttype)
                block, type_size = GGML_QUANT_SIZES[qtype]
                count = int(np.prod(dims)) if dims else 1
                nbytes = count // block * type_size
                begin = start + offset
                if begin + nbytes > len(self._map):
                    raise GGUFFormatError(f"tensor {name} ends at byte {begin + nbytes}, the file has {len(self._map)}")
                raw = self._map[begin:begin + nbytes]
                rows = tuple(reversed(dims[1:]))
                if qtype == GGMLQuantizationType.F32:
                    data = raw.view(np.float32).reshape(*rows, dims[0])
                elif qtype == GGMLQuantizationType.F16:
                    data = raw.view(np.float16).reshape(*rows, dims[0])
                elif qtype == GGMLQuantizationType.BF16:
                    data = raw.view(np.uint16).reshape(*rows, dims[0])
                else:
                    data = raw.reshape(*rows, dims[0] // block * type_size)
                self.tensors.append(GGUFTensor(name, dims, qtype, data))
        except (struct.error, IndexError, KeyError) as err:
            raise GGUFFormatError(f"truncated or damaged header ({type(err).__name__}: {err})") from None
        finally:
            self._buf = None

    def _take(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (n,) = self._take("<Q")
        if self._pos + n > len(self._buf):
            raise GGUFFormatError("a string runs past the end of the file")
        s = bytes(self._buf[self._pos:self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            return self._take("<" + _SCALARS[vtype])[0]
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._take("<IQ")
            self._skip_array(etype, count)
            return count  # only the length: the arrays are the tokenizer's, read by its converter
        raise GGUFFormatError(f"unknown GGUF value type {vtype}")

    def _skip_array(self, etype: int, count: int) -> None:
        if etype in _SCALARS:
            self._pos += struct.calcsize("<" + _SCALARS[etype]) * count
            if self._pos > len(self._buf):
                raise GGUFFormatError("an array runs past the end of the file")
        elif etype == _STRING:
            buf, pos, unpack = self._buf, self._pos, struct.unpack_from
            for _ in range(count):
                (n,) = unpack("<Q", buf, pos)
                pos += 8 + n
            if pos > len(buf):
                raise GGUFFormatError("an array of strings runs past the end of the file")
            self._pos = pos
        elif etype == _ARRAY:
            for _ in range(count):
                inner, n = self._take("<IQ")
                self._skip_array(inner, n)
        else:
            raise GGUFFormatError(f"unknown GGUF array element type {etype}")
