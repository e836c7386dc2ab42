"""THE split table: which tensor splits on which dimension, and what each rank holds.

Used by the cutter (``weights.parts``) and by the loader alike, so a part on disk and a part
sliced at load time are the same thing.

Rules (as in the seed): q/k/v/gate/up split along output features (dim 0), o_proj/down_proj
along input features (dim 1); norms and the token embedding are replicated; lm_head is split
along the vocabulary (dim 0) so each rank reads only its share of the largest matrix of a small
model per token, and rank 0 gathers the logits.

Every all-reduce of a step is a barrier, so each half of a layer must be even on its own: a
rank with less attention work cannot make up for it with more FFN columns, it waits at the
attention's all-reduce either way. So the attention and the FFN are each split in proportion.

Attention, N ranks <= KV heads: the KV groups (a KV head and its query heads) are laid in a row
and each rank takes its proportion of that row, in 1/POSITION_UNITS of a group (equal
proportions: the rounding favours the last ranks, as rank 0 also drives generation). A group
that falls wholly inside a rank's span is that rank's alone; a group cut between ranks is held
by each of them (its KV head and all its query heads) and its keys are split by position: each
rank attends to its fraction of every query's keys and the partial results are merged with
their log-sum-exp (one small all-gather per layer), so the KV cache read and the arithmetic
of every step stay in proportion at any context length. SmolLM2 (3 KV heads) at N = 2: rank 0
holds KV heads 0-1 and attends to all of head 0's keys and the first half of head 1's, rank 1
the second half of head 1's and all of head 2's. When the proportions fall on group boundaries
(N divides the KV heads, equal shares) this is the plain whole-group split.

Attention, KV heads < N <= query heads: the ranks are spread over the KV groups as evenly as
possible and each rank holds a copy of one KV head and part of its group's query heads (vLLM's
rule for TP > KV heads, without its divisibility limits): the KV cache of a rank holds that one
head.

The FFN is split in blocks of 32 features (quantized blocks are never cut in half) in
proportion; the vocabulary rows of the lm_head too.

Proportions (``--shares 3,1``): relative speeds of the ranks, e.g. from ``tpllama probe``;
default equal.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import ModelArgs
from ..errors import ShardError

FFN_ALIGN = 32
# A rank's span of the KV groups is counted in 1/POSITION_UNITS of a group; a query with n keys
# attends in a group it holds the fraction [lo, hi) of to keys n * lo // U .. n * hi // U - 1.
POSITION_UNITS = 1 << 12


@dataclasses.dataclass(frozen=True)
class RankShare:
    """What rank ``rank`` of ``world_size`` holds. Ranges are [start, end)."""

    rank: int
    world_size: int
    kv_heads: tuple[int, int]
    heads: tuple[int, int]
    ffn: tuple[int, int]
    vocab: tuple[int, int]
    # the rank's span of the row of KV groups in 1/POSITION_UNITS of a group (see the module
    # docs); None: whole KV groups (cuts made before spans) or KV-head copies (N > KV heads)
    kv_span: tuple[int, int] | None = None

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

    def key_fractions(self) -> tuple[tuple[int, int], ...]:
        """For each KV head the rank holds, the fraction [lo, hi) of every query's keys it
        attends to, in 1/POSITION_UNITS: (0, POSITION_UNITS) for a whole group."""
        if self.kv_span is None:
            return ((0, POSITION_UNITS),) * self.n_kv_heads
        a, b = self.kv_span
        return tuple((max(a - g * POSITION_UNITS, 0), min(b - g * POSITION_UNITS, POSITION_UNITS))
                     for g in range(*self.kv_heads))

    @property
    def kv_heads_read(self) -> float:
        """KV heads' worth of cache a decode step of this rank reads (its fractions of the keys)."""
        return sum(hi - lo for lo, hi in self.key_fractions()) / POSITION_UNITS

    @property
    def splits_positions(self) -> bool:
        """True when the rank holds part of a KV group's keys (a group cut between ranks)."""
        return any(f != (0, POSITION_UNITS) for f in self.key_fractions())

    def describe(self) -> str:
        parts = []
        for g, (lo, hi) in zip(range(*self.kv_heads), self.key_fractions()):
            if (lo, hi) != (0, POSITION_UNITS):
                parts.append(f"KV head {g}: keys {lo / POSITION_UNITS:.3g}-{hi / POSITION_UNITS:.3g} of each query's")
        keys = f" ({'; '.join(parts)})" if parts else ""
        return (
            f"rank {self.rank}/{self.world_size}: {self.n_heads} heads {self.heads}, "
            f"{self.n_kv_heads} KV heads {self.kv_heads}{keys}, FFN {self.ffn_dim} {self.ffn}, "
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


def _kv_spans(args: ModelArgs, weights: list[float]):
    """N <= KV heads: each rank's span of the row of KV groups, in 1/POSITION_UNITS of a group
    (see the module docs) -> [(query heads, KV heads, span)]."""
    g, unit = args.group_size, POSITION_UNITS
    equal = len(set(weights)) == 1
    out = []
    for a, b in _ranges(_apportion(args.n_kv_heads * unit, weights, extra_to_last=equal)):
        kv = (a // unit, -(-b // unit))
        out.append(((kv[0] * g, kv[1] * g), kv, (a, b)))
    return out


def _kv_copies(args: ModelArgs, world_size: int, weights: list[float]):
    """KV heads < N <= query heads: ranks per group, then each group's query heads among its
    ranks, each rank with a copy of its group's KV head -> [(query heads, KV heads, None)]."""
    g = args.group_size
    ranks_per_group = _apportion(world_size, [1.0] * args.n_kv_heads, extra_to_last=True)
    if any(n > g for n in ranks_per_group):
        raise ShardError(f"world size {world_size}: a KV group of {g} query heads cannot be split over "
                         f"{max(ranks_per_group)} ranks")
    out, r = [], 0
    for kvh, n in enumerate(ranks_per_group):
        mine = weights[r:r + n]
        for a, b in _ranges(_apportion(g, mine, extra_to_last=len(set(mine)) == 1)):
            out.append(((kvh * g + a, kvh * g + b), (kvh, kvh + 1), None))
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
    if world_size == 1:
        attention = [((0, args.n_heads), (0, args.n_kv_heads), None)]
    elif world_size <= args.n_kv_heads:
        attention = _kv_spans(args, weights)
    else:
        attention = _kv_copies(args, world_size, weights)
    equal = len(set(weights)) == 1
    ffn = [(a * unit, b * unit) for a, b in _ranges(_apportion(args.ffn_dim // unit, weights, extra_to_last=equal))]
    vocab = _ranges(_apportion(args.vocab_size, weights))
    return [RankShare(r, world_size, kv, heads, ffn[r], vocab[r], span)
            for r, (heads, kv, span) in enumerate(attention)]


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
