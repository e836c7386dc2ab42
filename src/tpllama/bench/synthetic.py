"""Synthetic models for ``tpllama bench --synthetic NAME``: published LLaMA configs with random
weights, written straight into a cut directory (the format ``tpllama cut`` writes), rank by rank
and tensor by tensor, each tensor generated directly in its rank's share shape. The full-precision
model never exists in memory: peak memory is about one float32 tensor of one rank.

Directories are kept in the cache (``$TPLLAMA_CACHE/synthetic/``) and reused.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import torch

from ..config import ModelArgs
from ..env import cache_dir
from ..parallel.plan import RankShare, feature_range, plan, split_rule
from ..weights.checkpoint import EMBED, expected_shapes
from ..weights.parts import PartsWriter, is_cut_dir
from ..weights.staging import StagedWrite
from ..weights.stored import is_linear

_LLAMA1 = dict(max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2)

SYNTHETIC: dict[str, dict] = {
    "llama-7b": dict(_LLAMA1, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=11008, vocab_size=32000),
    "llama-13b": dict(_LLAMA1, hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                      intermediate_size=13824, vocab_size=32000),
    # TinyLlama-1.1B (the shape distributed-llama is measured on across hosts)
    "tinyllama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           intermediate_size=5632, vocab_size=32000, tie_word_embeddings=False,
                           max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                           bos_token_id=1, eos_token_id=2),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         bos_token_id=1, eos_token_id=2),
}

INIT_STD = 0.02
SYNTH_VERSION = 1


def synthetic_args(name: str) -> ModelArgs:
    if name not in SYNTHETIC:
        raise ValueError(f"unknown synthetic model {name!r}; allowed: {', '.join(SYNTHETIC)}")
    return ModelArgs.from_hf_config(dict(SYNTHETIC[name], model_type="llama", architectures=["LlamaForCausalLM"]))


def synthetic_dir(name: str, world_size: int, dtype: torch.dtype, quant: str | None) -> Path:

    d = str(dtype).removeprefix("torch.")
    return cache_dir() / "synthetic" / f"{name}-tp{world_size}-{d}-{quant or 'none'}-v{SYNTH_VERSION}"


def _generator(name: str, rank: int | None) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(f"{name}|{rank}".encode()).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed(seed)


def _random(shape: tuple[int, ...], name: str, rank: int | None) -> torch.Tensor:
    """float32 N(0, INIT_STD) of ``shape``; norms are ones."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.float32)
    t = torch.empty(shape, dtype=torch.float32)
    t.normal_(0.0, INIT_STD, generator=_generator(name, rank))
    return t


def share_shape(name: str, shape: tuple[int, ...], share: RankShare, args: ModelArgs) -> tuple[int, ...]:
    """Shape of rank ``share``'s slice of tensor ``name`` (whole shape ``shape``)."""
    rule = split_rule(name)
    if rule is None or share.world_size == 1:
        return shape
    dim, which = rule
    start, end = feature_range(share, which, args)
    out = list(shape)
    out[dim] = end - start
    return tuple(out)


def _stored(name: str, w: torch.Tensor, dtype: torch.dtype, quant: str | None):
    """(stored name, tensor) pairs for weight ``name`` (float32 ``w``), quantized when asked."""
    if quant and is_linear(name) and w.shape[1] % 32 == 0:
        from ..model import quant as quantmod

        module = name[: -len(".weight")]
        q = quantmod.quantize_weight(w, quant)
        return [(f"{module}.{suffix}", t) for suffix, t in q.stored_tensors().items()]
    return [(name, w.to(dtype))]


def write_synthetic(name: str, world_size: int, dtype: torch.dtype, quant: str | None = None,
                    target: Path | None = None, progress: bool = True) -> Path:
    """The cut directory of synthetic model ``name`` for ``world_size`` ranks (made now if missing)."""
    args = synthetic_args(name)
    shares = plan(args, world_size)
    target = target or synthetic_dir(name, world_size, dtype, quant)
    if is_cut_dir(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    from .roofline import weight_bytes

    need = 2 * weight_bytes(args, dtype, quant) * (1 + 0.1 * (world_size - 1))  # data side file + final file
    if need > free:
        raise ValueError(f"synthetic {name} needs about {need / 1e9:.1f} GB of disk under {target.parent} while writing, "
                         f"{free / 1e9:.1f} GB are free")
    shapes = expected_shapes(args)
    from tqdm import tqdm

    with StagedWrite(target, progress=progress) as staged:
        if is_cut_dir(target):  # made by another process while we waited
            return target
        writer = PartsWriter(staged.temp_dir(), args, shares)
        bar = tqdm(total=len(shapes) + 1, desc=f"synthetic {name} x{world_size}", unit="tensor", disable=not progress,
                   leave=False, file=sys.stderr)
        for tname, shape in shapes.items():
            if split_rule(tname) is None or world_size == 1:  # replicated: one tensor, the same on every rank
                w = _random(shape, tname, None)
                pairs = _stored(tname, w, dtype, quant) if tname != EMBED else [(tname, w.to(dtype))]
                for share in shares:
                    for n, t in pairs:
                        writer.write(share.rank, n, t)
            else:
                for share in shares:
                    w = _random(share_shape(tname, shape, share, args), tname, share.rank)
                    for n, t in _stored(tname, w, dtype, quant):
                        writer.write(share.rank, n, t)
                    del w
            bar.update(1)
        bar.update(1)
        bar.close()
        source = {"path": f"synthetic:{name}", "kind": "synthetic", "init": f"normal(0, {INIT_STD}), norms 1"}
        writer.finish(dtype, quant, source, None)
        staged.publish(writer.directory)
    return target
