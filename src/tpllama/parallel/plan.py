"""THE split table: which tensor splits on which dimension, and what each rank holds.

Used by the cutter (``cut.py``) and by the loader alike, so a part on disk and a part sliced at
load time are the same thing.

Rules (as in the seed): q/k/v/gate/up split along output features (dim 0), o_proj/down_proj
along input features (dim 1); norms and the token embedding are replicated; lm_head is split
along the vocabulary (dim 0) so each rank reads only 1/N of the largest matrix of a small model
per token, and rank 0 gathers the logits. Attention heads are split in whole KV groups, balanced
(the last ``n_kv % N`` ranks get one more group: rank 0 also drives generation); the FFN is split
in blocks of 32 features, so quantized blocks are never cut in half, and unevenly where the
heads are uneven, so that every rank holds as nearly as possible the same number of layer
weights (attention + FFN) and reads the same weight bytes per decode step.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import ModelArgs

FFN_ALIGN = 32


class ShardError(ValueError):
    """A world size this model cannot be split into."""


@dataclasses.dataclass(frozen=True)
class RankShare:
    """What rank ``rank`` of ``world_size`` holds. Ranges are [start, end)."""

    rank: int
    world_size: int
    kv_heads: tuple[int, int]
    heads: tuple[int, int]
    ffn: tuple[int, int]
    vocab: tuple[int, int]

    @property
    def n_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def ffn_dim(self) -> int:
        return self.ffn[1] - self.ffn[0]

    @property
    def vocab_rows(self) -> int:
        return self.vocab[1] - self.vocab[0]

    def describe(self) -> str:
        return (
            f"rank {self.rank}/{self.world_size}: {self.n_heads} heads {self.heads}, "
            f"{self.n_kv_heads} KV heads {self.kv_heads}, FFN {self.ffn_dim} {self.ffn}, "
            f"vocab rows {self.vocab_rows} {self.vocab}"
        )

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _ranges(counts: list[int]) -> list[tuple[int, int]]:
    ranges, start = [], 0
    for n in counts:
        ranges.append((start, start + n))
        start += n
    return ranges


def _kv_groups(n_kv_heads: int, world_size: int) -> list[tuple[int, int]]:
    """Whole KV groups, as even as possible; the extra groups go to the last ranks."""
    base, extra = divmod(n_kv_heads, world_size)
    return _ranges([base + (1 if r >= world_size - extra else 0) for r in range(world_size)])


def _ffn_units(fixed: list[int], units: int, per_unit: int) -> list[int]:
    """Split ``units`` FFN blocks (``per_unit`` weights each, at least one per rank) so that
    ``fixed[r]`` + rank r's FFN weights are as equal as possible: each block in turn goes to the
    rank holding the fewest weights (ties: the lowest rank)."""
    counts = [1] * len(fixed)
    for _ in range(units - len(fixed)):
        r = min(range(len(fixed)), key=lambda i: (fixed[i] + counts[i] * per_unit, i))
        counts[r] += 1
    return counts


def plan(args: ModelArgs, world_size: int) -> list[RankShare]:
    """The share of every rank, or ShardError naming why ``world_size`` cannot be served."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ShardError(f"world size must be a positive integer, got {world_size!r}")
    if world_size > args.n_kv_heads:
        raise ShardError(
            f"world size {world_size} is larger than the model's {args.n_kv_heads} KV heads: heads are split in "
            f"whole KV groups, so at most {args.n_kv_heads} ranks can be used"
        )
    unit = FFN_ALIGN if args.ffn_dim % FFN_ALIGN == 0 else 1
    if args.ffn_dim // unit < world_size:
        raise ShardError(f"FFN width {args.ffn_dim} is too small to split over {world_size} ranks")
    g = args.group_size
    kv = _kv_groups(args.n_kv_heads, world_size)
    # weights per layer: q, o (g query heads per KV head) and k, v of each KV group; 3 per FFN feature
    attention = [(b - a) * (2 * g + 2) * args.head_dim * args.dim for a, b in kv]
    counts = _ffn_units(attention, args.ffn_dim // unit, 3 * args.dim * unit)
    ffn = [(a * unit, b * unit) for a, b in _ranges(counts)]
    base, extra = divmod(args.vocab_size, world_size)
    vocab = _ranges([base + (1 if r < extra else 0) for r in range(world_size)])
    return [
        RankShare(r, world_size, kv[r], (kv[r][0] * g, kv[r][1] * g), ffn[r], vocab[r]) for r in range(world_size)
    ]


# HF tensor-name suffix -> (dimension split, which range of RankShare, unit size in features)
SPLIT_TABLE: dict[str, tuple[int, str]] = {
    "self_attn.q_proj": (0, "heads"),
    "self_attn.k_proj": (0, "kv_heads"),
    "self_attn.v_proj": (0, "kv_heads"),
    "self_attn.o_proj": (1, "heads"),
    "mlp.gate_proj": (0, "ffn"),
    "mlp.up_proj": (0, "ffn"),
    "mlp.down_proj": (1, "ffn"),
    "lm_head": (0, "vocab"),
}


def split_rule(name: str) -> tuple[int, str] | None:
    """(dim, range name) for a tensor name like ``model.layers.3.mlp.up_proj.weight`` (or a
    quantized part such as ``...up_proj.scales``); None for replicated tensors."""
    module = name.rsplit(".", 1)[0]
    for suffix, rule in SPLIT_TABLE.items():
        if module.endswith(suffix):
            return rule
    return None


def feature_range(share: RankShare, which: str, args: ModelArgs) -> tuple[int, int]:
    start, end = getattr(share, which)
    per = args.head_dim if which in ("heads", "kv_heads") else 1
    return start * per, end * per


def slice_for_rank(name: str, tensor: torch.Tensor, share: RankShare, args: ModelArgs, in_features: int | None = None):
    """This rank's slice of ``tensor`` (a view). ``in_features`` is the logical input width of a
    linear layer whose stored dim 1 is packed (int4 nibbles, per-block scales): the range is
    scaled by ``tensor.shape[1] / in_features``."""
    rule = split_rule(name)
    if rule is None or share.world_size == 1:
        return tensor
    dim, which = rule
    start, end = feature_range(share, which, args)
    if dim == 1 and in_features is not None and tensor.shape[1] != in_features:
        ratio = in_features // tensor.shape[1]
        if start % ratio or end % ratio:
            raise ShardError(f"{name}: split at {start}:{end} is not aligned to its {ratio}-feature blocks")
        start, end = start // ratio, end // ratio
    return tensor.narrow(dim, start, end - start)
