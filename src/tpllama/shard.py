"""THE split table: which tensor splits on which dimension, and what each rank holds.

Used by the cutter (``cut.py``) and by the loader alike, so a part on disk and a part sliced at
load time are the same thing.

Rules (as in the seed): q/k/v/gate/up split along output features (dim 0), o_proj/down_proj
along input features (dim 1); norms and the token embedding are replicated; lm_head is split
along the vocabulary (dim 0) so each rank reads only 1/N of the largest matrix of a small model
per token, and rank 0 gathers the logits. Attention heads are split in whole KV groups, balanced
(the first ``n_kv % N`` ranks get one more group); the FFN is split in blocks of 32 features so
quantized blocks are never cut in half.
"""

from __future__ import annotations

import dataclasses

import torch

from .config import ModelArgs

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


def _balanced(total_units: int, world_size: int) -> list[tuple[int, int]]:
    base, extra = divmod(total_units, world_size)
    ranges, start = [], 0
    for r in range(world_size):
        n = base + (1 if r < extra else 0)
        ranges.append((start, start + n))
        start += n
    return ranges


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
    kv = _balanced(args.n_kv_heads, world_size)
    ffn = [(a * unit, b * unit) for a, b in _balanced(args.ffn_dim // unit, world_size)]
    vocab = _balanced(args.vocab_size, world_size)
    g = args.group_size
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
