"""Reading checkpoints: Hugging Face directories and GGUF files, tensor by tensor.

Every reader exposes the same thing: ``ModelArgs`` and lazily read tensors under Hugging Face
names in Hugging Face layout (GGUF's q/k row permutation undone). Nothing is read before it is
asked for; safetensors and GGUF files are memory-mapped.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..config import ConfigError, ModelArgs
from ..errors import CheckpointError


# ---------------------------------------------------------------------- names and shapes
def layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "q": p + "self_attn.q_proj.weight",
        "k": p + "self_attn.k_proj.weight",
        "v": p + "self_attn.v_proj.weight",
        "o": p + "self_attn.o_proj.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
        "attn_norm": p + "input_layernorm.weight",
        "ffn_norm": p + "post_attention_layernorm.weight",
    }


EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor a checkpoint of ``args`` must hold."""
    d, hd = args.dim, args.head_dim
    shapes: dict[str, tuple[int, ...]] = {EMBED: (args.vocab_size, d), FINAL_NORM: (d,)}
    if not args.tie_word_embeddings:
        shapes[LM_HEAD] = (args.vocab_size, d)
    for i in range(args.n_layers):
        n = layer_names(i)
        shapes.update(
            {
                n["q"]: (args.n_heads * hd, d),
                n["k"]: (args.n_kv_heads * hd, d),
                n["v"]: (args.n_kv_heads * hd, d),
                n["o"]: (d, args.n_heads * hd),
                n["gate"]: (args.ffn_dim, d),
                n["up"]: (args.ffn_dim, d),
                n["down"]: (d, args.ffn_dim),
                n["attn_norm"]: (d,),
                n["ffn_norm"]: (d,),
            }
        )
    return shapes


def check_shape(name: str, shape: tuple[int, ...], args: ModelArgs) -> None:
    want = expected_shapes(args).get(name)
    if want is not None and tuple(shape) != want:
        raise CheckpointError(f"tensor {name} has shape {tuple(shape)}, expected {want} for this config")


# ---------------------------------------------------------------------- base
class Checkpoint:
    """A model's weights, read lazily. Subclasses fill ``args``, ``path`` and the readers."""

    args: ModelArgs
    path: Path
    kind: str = "?"

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        """The tensor in HF layout (native float dtype for HF files, float32 for dequantized GGUF)."""
        raise NotImplementedError

    def read_blocks(self, name: str):
        """For GGUF block-quantized tensors: (raw uint8 rows, ggml type) in HF row order; else None."""
        return None

    def validate(self) -> None:
        """Every expected tensor is present with the right shape; raises CheckpointError."""
        have = set(self.names())
        for name, want in expected_shapes(self.args).items():
            if name not in have:
                raise CheckpointError(f"{self.path}: tensor {name} is missing")
            got = tuple(self.shape(name))
            if got != want:
                raise CheckpointError(f"{self.path}: tensor {name} has shape {got}, expected {want}")

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------- HF directories
class HFCheckpoint(Checkpoint):
    kind = "hf"

    def __init__(self, path: Path):
        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{path} has no config.json: not a Hugging Face model directory")
        self.args = ModelArgs.from_json_file(cfg_path)
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._handles: dict[Path, object] = {}
        self._bins: dict[Path, dict[str, torch.Tensor]] = {}
        files = self._weight_files()
        for f in files:
            if f.suffix == ".safetensors":
                for name, shape in safetensors_shapes(f).items():
                    self._where[name] = f
                    self._shapes[name] = shape
            else:
                sd = self._load_bin(f)
                for name, t in sd.items():
                    self._where[name] = f
                    self._shapes[name] = tuple(t.shape)
        if LM_HEAD not in self._where and not self.args.tie_word_embeddings:
            raise CheckpointError(f"{path}: lm_head.weight is missing and tie_word_embeddings is false")

    def _weight_files(self) -> list[Path]:
        p = self.path
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = p / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as err:
                    raise CheckpointError(f"{index} is not a valid shard index: {err}") from None
                files = sorted({p / f for f in weight_map.values()})
                for f in files:
                    if not f.is_file():
                        raise CheckpointError(f"{index} names {f.name}, which is missing")
                return files
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (p / single).is_file():
                return [p / single]
        shards = sorted(p.glob("*.safetensors"))
        if shards:
            return shards
        raise CheckpointError(
            f"{p} holds no weights: expected model.safetensors, a sharded safetensors index, or pytorch_model*.bin"
        )

    def _load_bin(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._bins:
            try:
                self._bins[f] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # torch raises many kinds for a bad pickle/zip
                raise CheckpointError(f"{f} cannot be read as a PyTorch checkpoint: {err}") from None
        return self._bins[f]

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        if name == LM_HEAD and name not in self._shapes:
            return self._shapes[EMBED]
        return self._shapes[name]

    def read(self, name: str) -> torch.Tensor:
        if name == LM_HEAD and name not in self._where:
            name = EMBED
        f = self._where.get(name)
        if f is None:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            handle = self._handles.get(f)
            if handle is None:
                try:
                    handle = self._handles[f] = safe_open(str(f), framework="pt")
                except Exception as err:
                    raise CheckpointError(f"{f} is not a readable safetensors file: {err}") from None
            t = handle.get_tensor(name)
        else:
            t = self._load_bin(f)[name]
        return t

    def close(self) -> None:
        self._handles.clear()
        self._bins.clear()


def safetensors_shapes(f: Path) -> dict[str, tuple[int, ...]]:
    """Parse and check a safetensors header: names and shapes, offsets within the file."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(fh.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{f} is not a valid safetensors file (corrupt or truncated): {err}") from None
    data_len = size - 8 - n
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if end > data_len:
            raise CheckpointError(
                f"{f} is truncated: tensor {name} ends at byte {end} of the data section, which holds {data_len}"
            )
        shapes[name] = tuple(info["shape"])
    return shapes


# ---------------------------------------------------------------------- GGUF files
_GGUF_LAYER = {
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
}


def gguf_to_hf_name(name: str) -> str | None:
    if name == "token_embd.weight":
        return EMBED
    if name == "output_norm.weight":
        return FINAL_NORM
    if name == "output.weight":
        return LM_HEAD
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _GGUF_LAYER:
        return layer_names(int(parts[1]))[_GGUF_LAYER[parts[2]]]
    return None


def unpermute_rows(w, n_heads: int):
    """Undo llama.cpp's q/k row permutation (interleaved rotary halves -> HF's rotate_half).

    ``w`` [rows, ...] numpy or torch; rows = n_heads * head_dim."""
    rows = w.shape[0]
    rest = tuple(w.shape[1:])
    w = w.reshape(n_heads, rows // n_heads // 2, 2, *rest)
    w = w.swapaxes(1, 2) if isinstance(w, np.ndarray) else w.transpose(1, 2)
    return w.reshape(rows, *rest)


class GGUFCheckpoint(Checkpoint):
    kind = "gguf"

    def __init__(self, path: Path):
        from .gguf_file import GGUFFile

        self.path = path
        try:
            self.reader = GGUFFile(path)
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable GGUF file (corrupt or truncated?): {err}") from None
        fields = dict(self.reader.fields)  # scalars, and the length of each array
        self._tensors = {}
        for t in self.reader.tensors:
            hf = gguf_to_hf_name(t.name)
            if hf is not None:
                self._tensors[hf] = t
        fields["_tied"] = LM_HEAD not in self._tensors
        try:
            self.args = ModelArgs.from_gguf_fields(fields)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        self.fields = fields

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        t = self._tensors.get(name) or (self._tensors[EMBED] if name == LM_HEAD else None)
        return tuple(int(x) for x in reversed(t.shape))

    def _tensor(self, name: str):
        t = self._tensors.get(name)
        if t is None and name == LM_HEAD:
            t = self._tensors.get(EMBED)
        if t is None:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        return t

    def _permute_heads(self, name: str) -> int | None:
        if name.endswith("q_proj.weight"):
            return self.args.n_heads
        if name.endswith("k_proj.weight"):
            return self.args.n_kv_heads
        return None

    def read(self, name: str) -> torch.Tensor:
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        t = self._tensor(name)
        shape = self.shape(name)
        if t.tensor_type in (Q.F32, Q.F16):
            arr = np.asarray(t.data).reshape(shape)
            tensor = torch.from_numpy(arr.copy())
        elif t.tensor_type == Q.BF16:
            raw = np.asarray(t.data).view(np.int16).reshape(shape)
            tensor = torch.from_numpy(raw.copy()).view(torch.bfloat16)
        elif t.tensor_type == Q.Q8_0:  # the same float32 products as gguf's numpy, on torch's threads
            with warnings.catch_warnings():  # a read-only memory map, only read from here
                warnings.simplefilter("ignore", UserWarning)
                blocks = torch.from_numpy(np.asarray(t.data)).view(-1, 34)
            scale = blocks[:, :2].contiguous().view(torch.float16).float()
            tensor = (blocks[:, 2:].contiguous().view(torch.int8).float() * scale).reshape(shape)
        else:
            try:
                arr = dequantize(t.data, t.tensor_type)
            except NotImplementedError:
                raise CheckpointError(
                    f"{self.path}: tensor {t.name} has GGUF type {t.tensor_type.name}, which cannot be dequantized"
                ) from None
            tensor = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(shape))
        heads = self._permute_heads(name)
        if heads is not None:
            tensor = unpermute_rows(tensor, heads).contiguous()
        return tensor

    def read_blocks(self, name: str):
        from gguf import GGMLQuantizationType as Q

        t = self._tensor(name)
        if t.tensor_type not in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
            return None
        raw = np.asarray(t.data)
        heads = self._permute_heads(name)
        if heads is not None:
            raw = np.ascontiguousarray(unpermute_rows(raw, heads))
        return raw, t.tensor_type

    def close(self) -> None:
        self.reader = None


# ---------------------------------------------------------------------- entry point
def gguf_file(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself, or the one .gguf of a directory without config.json."""
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        return ggufs[0] if not (path / "config.json").is_file() and len(ggufs) == 1 else None
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        return path
    raise CheckpointError(f"{path} is neither a model directory nor a GGUF file (magic bytes {magic!r})")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open an HF directory or a .gguf file; raises CheckpointError/ConfigError naming the problem."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"model path {p} does not exist")
    gguf = gguf_file(p)
    return GGUFCheckpoint(gguf) if gguf is not None else HFCheckpoint(p)


def iter_tensors(ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    for name in expected_shapes(ckpt.args):
        yield name, ckpt.read(name)
