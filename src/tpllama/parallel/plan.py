"""THE split table: which tensor splits on which dimension, and what each rank holds.

Used by the cutter (``weights.parts``) and by the loader alike, so a part on disk and a part
sliced at load time are the same thing.

Rules (as in the seed): q/k/v/gate/up split along output features (dim 0), o_proj/down_proj
along input features (dim 1); norms and the token embedding are replicated; lm_head is split
along the vocabulary (dim 0) so each rank reads only its share of the largest matrix of a small
model per token, and rank 0 gathers the logits.

Attention heads: with N ranks and at most as many KV heads, each rank holds whole KV groups (a
KV head and its query heads), as many as its proportion asks (equal proportions: the last
``n_kv % N`` ranks get one group more: rank 0 also drives generation). With more ranks than KV
heads (up to the number of query heads), the ranks are spread over the KV groups as evenly as
possible and each rank holds a copy of one KV head and part of its group's query heads (vLLM's
rule for TP > KV heads, without its divisibility limits): the KV cache of a rank holds that one
head. The FFN is split in blocks of 32 features (quantized blocks are never cut in half) in
proportion, on its own: every all-reduce of a step is a barrier, so each half of a layer has to
be even by itself, and a rank with fewer heads that held more FFN columns to even out the
weights would only wait at the attention's all-reduce and make the others wait at the MLP's.
The vocabulary rows follow the proportions too.

Proportions (``--shares 3,1``): relative speeds of the ranks, e.g. from ``tpllama probe``;
default equal.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import ModelArgs
from ..errors import ShardError

FFN_ALIGN = 32


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


def _apportion(total: int, weights: list[float], minimum: int = 1, extra_to_last: bool = False) -> list[int]:
    """``total`` units over len(weights) parts in proportion to ``weights``, at least ``minimum``
    each (largest remainder; ties go to the first parts, or to the last ones)."""
    n = len(weights)
    w = sum(weights)
    ideal = [total * x / w for x in weights]
    counts = [max(minimum, int(v)) for v in ideal]
    order = list(range(n))[::-1] if extra_to_last else list(range(n))
    rank_in_order = {i: k for k, i in enumerate(order)}
    while sum(counts) > total:  # the minimum pushed some up: take back from the most over-served
        r = max((i for i in order if counts[i] > minimum), key=lambda i: (counts[i] - ideal[i], -rank_in_order[i]))
        counts[r] -= 1
    while sum(counts) < total:  # the largest remainders first
        r = max(order, key=lambda i: (ideal[i] - counts[i], -rank_in_order[i]))
        counts[r] += 1
    return counts


def check_proportions(proportions, world_size: int) -> list[float]:
    """The proportions as floats (ShardError naming what is wrong)."""
    if proportions is None:
        return [1.0] * world_size
    try:
        values = [float(x) for x in proportions]
    except (TypeError, ValueError):
        raise ShardError(f"shares must be numbers, one per rank, got {proportions!r}") from None
    if len(values) != world_size:
        raise ShardError(f"{len(values)} shares ({', '.join(map(str, proportions))}) given for {world_size} ranks: "
                         f"one per rank")
    if any(not v > 0 or v == float("inf") for v in values):
        raise ShardError(f"shares must be positive finite numbers, got {', '.join(map(str, proportions))}")
    return values


def _heads(args: ModelArgs, world_size: int, weights: list[float]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(query heads, KV heads) of every rank; see the module docstring."""
    g = args.group_size
    if world_size <= args.n_kv_heads:  # whole KV groups
        equal = len(set(weights)) == 1
        kv = _ranges(_apportion(args.n_kv_heads, weights, extra_to_last=equal))
        return [((a * g, b * g), (a, b)) for a, b in kv]
    # more ranks than KV heads: ranks per group, then each group's query heads among its ranks
    ranks_per_group = _apportion(world_size, [1.0] * args.n_kv_heads, extra_to_last=True)
    if any(n > g for n in ranks_per_group):
        raise ShardError(f"world size {world_size}: a KV group of {g} query heads cannot be split over "
                         f"{max(ranks_per_group)} ranks")
    out, r = [], 0
    for kvh, n in enumerate(ranks_per_group):
        mine = weights[r:r + n]
        for a, b in _ranges(_apportion(g, mine, extra_to_last=len(set(mine)) == 1)):
            out.append(((kvh * g + a, kvh * g + b), (kvh, kvh + 1)))
        r += n
    return out


def plan(args: ModelArgs, world_size: int, proportions=None) -> list[RankShare]:
    """The share of every rank, or ShardError naming why ``world_size`` cannot be served.
    ``proportions``: relative speeds of the ranks (default equal)."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ShardError(f"world size must be a positive integer, got {world_size!r}")
    if world_size > args.n_heads:
        raise ShardError(
            f"world size {world_size} is larger than the model's {args.n_heads} query heads: each rank needs at "
            f"least one, so at most {args.n_heads} ranks can be used"
        )
    weights = check_proportions(proportions, world_size)
    unit = FFN_ALIGN if args.ffn_dim % FFN_ALIGN == 0 else 1
    if args.ffn_dim // unit < world_size:
        raise ShardError(f"FFN width {args.ffn_dim} is too small to split over {world_size} ranks")
    heads = _heads(args, world_size, weights)
    equal = len(set(weights)) == 1
    ffn = [(a * unit, b * unit) for a, b in _ranges(_apportion(args.ffn_dim // unit, weights, extra_to_last=equal))]
    vocab = _ranges(_apportion(args.vocab_size, weights))
    return [RankShare(r, world_size, heads[r][1], heads[r][0], ffn[r], vocab[r]) for r in range(world_size)]


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
