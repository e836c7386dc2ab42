"""Re-cutting a cut: N parts into M, without the original checkpoint.

``CutReader`` reads a cut directory back as the whole model's stored tensors (float or quantized,
exactly as ``stored.stored_tensors`` made them): a split tensor is the concatenation of the ranks'
slices (a KV head held by several ranks counted once), a replicated one comes from rank 0. Every
part file's sha256 is checked against the manifest before anything is read. ``recut`` streams
those tensors, one at a time, through the same split plan and parts writer as ``cut``, so the
parts it writes are byte for byte those of cutting the original checkpoint to M directly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..config import ModelArgs, torch_dtype
from ..parallel.plan import RankShare, plan, slice_for_rank, split_rule
from .checkpoint import CheckpointError, expected_shapes, safetensors_shapes
from .default_model import sha256_file
from .parts import MANIFEST, PartsWriter, read_manifest, share_from_json
from .staging import StagedWrite


class CutReader:
    """The stored tensors of a whole model, read back from a cut directory (see the module docstring)."""

    def __init__(self, directory: str | Path, verify: bool = True, progress: bool = False):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.args = ModelArgs.from_hf_config(self.manifest["config"])
        self.shares: list[RankShare] = [share_from_json(e) for e in self.manifest["ranks"]]
        self.dtype = torch_dtype(self.manifest["dtype"])
        self.quant = None if self.manifest.get("quant", "none") == "none" else self.manifest["quant"]
        files = [self.directory / "part_model" / str(s.rank) / "model.safetensors" for s in self.shares]
        if verify:
            self._verify(progress)
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self.names = list(safetensors_shapes(files[0]))  # in the order they were written

    def _verify(self, progress: bool) -> None:
        from tqdm import tqdm

        entries = [(self.directory / "part_model" / str(r) / name, digest)
                   for r, e in enumerate(self.manifest["ranks"]) for name, digest in e["files"].items()]
        for f, digest in tqdm(entries, desc="checking the parts' sha256", unit="file", disable=not progress,
                              file=sys.stderr, leave=False):
            if not f.is_file():
                raise CheckpointError(f"{f} is missing (listed in {self.directory / MANIFEST})")
            got = sha256_file(f)
            if got != digest:
                raise CheckpointError(f"{f} is corrupt: sha256 {got} does not match the manifest's {digest}")

    def read(self, name: str) -> torch.Tensor:
        """The whole stored tensor ``name`` (e.g. ``model.layers.0.mlp.up_proj.qweight``)."""
        rule = split_rule(name)
        if rule is None or len(self.shares) == 1:
            return self._handles[0].get_tensor(name)
        dim, which = rule
        seen, pieces = set(), []
        for share, h in zip(self.shares, self._handles):
            held = getattr(share, which)
            if held not in seen:  # a KV head held by several ranks: once
                seen.add(held)
                pieces.append(h.get_tensor(name))
        return torch.cat(pieces, dim=dim)

    def in_features(self, name: str) -> int | None:
        """The logical input width of the linear layer a stored tensor belongs to."""
        shape = expected_shapes(self.args).get(name.rsplit(".", 1)[0] + ".weight")
        return shape[1] if shape is not None and len(shape) == 2 else None

    def tokenizer_source(self) -> Path:
        return self.directory / "part_model" / "0"


def recut(source: str | Path, output: str | Path, world_size: int, proportions=None, progress: bool = True) -> Path:
    """Write the cut at ``source`` (any world size and shares) again as ``world_size`` parts."""
    from tqdm import tqdm

    reader = CutReader(source, progress=progress)
    args = reader.args
    shares = plan(args, world_size, proportions)
    output = Path(output)
    with StagedWrite(output, progress=progress) as staged:
        writer = PartsWriter(staged.temp_dir(), args, shares)
        for name in tqdm(reader.names, desc=f"re-cutting into {world_size}", unit="tensor", disable=not progress,
                         file=sys.stderr, leave=False):
            t = reader.read(name)
            for share in shares:
                writer.write(share.rank, name, slice_for_rank(name, t, share, args, reader.in_features(name)))
            del t
        writer.finish(reader.dtype, reader.quant, reader.manifest["source"], reader.tokenizer_source(), proportions)
        staged.publish(writer.directory)
    return output
