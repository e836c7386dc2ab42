"""Where a rank's weights and the tokenizer come from.

A model path is an HF directory, a .gguf file or a cut directory (None: the default model).
Several ranks always load a cut: a cut directory as it is, or the cache's cut of an uncut
checkpoint (``$TPLLAMA_CACHE/parts/...``, made once by rank 0 before the ranks load). One rank
reads an uncut checkpoint directly.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from ..config import EngineConfig, ModelArgs
from ..env import cache_dir
from ..parallel.plan import RankShare, plan
from ..version import __version__
from . import parts as partsmod
from .checkpoint import CheckpointError, gguf_file, open_checkpoint
from .default_model import default_model_path
from .stored import rank_slice
from .tokenizer import Tokenizer, gguf_tokenizer_dir, load_tokenizer


def model_path(model: str | None, progress: bool) -> Path:
    """The model's path; the default model is fetched into the cache the first time."""
    return Path(model).expanduser() if model is not None else default_model_path(quiet=not progress)


def cut_cache_key(path: Path, world_size: int, dtype: torch.dtype, quant: str | None, proportions=None) -> str:
    """Identity of a cut in the cache: the source file's path, size and mtime, and the cut's settings."""
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    # the tool version and the parts' format: a cut made by an older tpllama is not reused
    ident = [str(path.resolve()), str(world_size), str(dtype), str(quant), __version__, partsmod.FORMAT, "stored-form-2", "plan-4"]
    if proportions is not None:
        ident.append("shares=" + ",".join(f"{x:g}" for x in proportions))
    ident += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("|".join(ident).encode()).hexdigest()[:16]


def resolve_parts(path: Path, world_size: int, dtype: torch.dtype, quant: str | None, progress: bool,
                  proportions=None) -> Path:
    """A cut directory for ``world_size`` ranks: ``path`` itself (checked against its manifest,
    refusing a mismatched world size naming both numbers), or the cache's cut of it with the
    ranks' ``proportions`` (made now if missing)."""
    if partsmod.is_cut_dir(path):
        manifest = partsmod.read_manifest(path)
        partsmod.check_world_size(path, manifest, world_size)
        if proportions is None or [float(x) for x in proportions] == manifest.get("shares"):
            return path
        # other shares asked for: re-cut it (once, into the cache), no original checkpoint needed
        from .recut import recut

        target = cache_dir() / "parts" / f"{path.name}-{cut_cache_key(path, world_size, dtype, quant, proportions)}"
        if not partsmod.is_cut_dir(target):
            if progress:
                print(f"tpllama: re-cutting {path} with shares {','.join(f'{x:g}' for x in proportions)} at {target} "
                      f"(first time only)", file=sys.stderr)
            recut(path, target, world_size, proportions, progress=progress)
        return target
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    key = cut_cache_key(path, world_size, dtype, quant, proportions)
    target = cache_dir() / "parts" / f"{path.stem}-tp{world_size}-{key}"
    if partsmod.is_cut_dir(target):
        return target
    ckpt = open_checkpoint(path)
    plan(ckpt.args, world_size, proportions)
    if progress:
        print(f"tpllama: cutting {ckpt.path} into {world_size} parts at {target} (first time only)", file=sys.stderr)
    partsmod.cut(ckpt, target, world_size, dtype=dtype, quant=quant, progress=progress, reuse=True,
                 proportions=proportions)
    return target


def with_parts(cfg: EngineConfig) -> EngineConfig:
    """``cfg`` with ``parts`` filled in where the ranks load a cut (several ranks, or a cut
    directory given), made into the cache first if needed; with ``model`` made a path."""
    import dataclasses

    path = model_path(cfg.model, cfg.progress)
    parts = None
    if cfg.world_size > 1 or partsmod.is_cut_dir(path):
        proportions = None if cfg.shares in (None, "auto") else cfg.shares
        parts = str(resolve_parts(path, cfg.world_size, cfg.torch_dtype, cfg.quant, cfg.progress, proportions))
    elif not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    return dataclasses.replace(cfg, model=str(path), parts=parts)


def rank_weights(cfg: EngineConfig, rank: int) -> tuple[ModelArgs, list[RankShare], dict[str, torch.Tensor]]:
    """(architecture, what every rank holds, this rank's stored tensors) for ``cfg`` (after
    ``with_parts``). Each rank reads only its own part, checked against the manifest."""
    if cfg.parts is not None:
        parts = Path(cfg.parts)
        args, _share, tensors, _quant = partsmod.load_part(parts, rank, cfg.world_size)
        return args, partsmod.manifest_shares(parts), tensors
    ckpt = open_checkpoint(cfg.model)
    ckpt.validate()
    share = plan(ckpt.args, 1)[0]
    return ckpt.args, [share], rank_slice(ckpt, share, cfg.torch_dtype, cfg.quant)


def tokenizer_for(cfg: EngineConfig) -> Tokenizer | None:
    """The model's tokenizer (None for a checkpoint without tokenizer files)."""
    if cfg.parts is not None:
        return load_tokenizer(Path(cfg.parts) / "part_model" / "0")
    path = Path(cfg.model)
    gguf = gguf_file(path)
    if gguf is not None:  # its own vocabulary, converted once into the cache
        tdir = gguf_tokenizer_dir(gguf, cache_dir())
        return load_tokenizer(tdir) if tdir else None
    return load_tokenizer(path)
