"""The LLaMA transformer in plain PyTorch, for one rank's share of the weights.

Nothing here knows about processes or torch.distributed: a tensor-parallel rank is just a model
built with smaller ``LocalSizes`` and given a ``reduce`` callable (sum over ranks, called after
the attention output projection and after the MLP down projection) and a ``gather_vocab``
callable (concatenate each rank's slice of the vocabulary logits). On one rank both are identity.
The fused C++ decode blocks (``model.fused``) are a second way to run a decode step of the same
weights, with the same ``reduce`` calls; the runner chooses between them.

Shapes: B = rows in the batch, T = new tokens per row, L = keys attended, D = head_dim,
H / Hkv = this rank's query / key-value heads, V_local = this rank's vocabulary rows.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelArgs, rope_inv_freq
from .kv_cache import KVCache

Reduce = Callable[[torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def linear(in_features: int, out_features: int, device=None, dtype=None, weight: torch.Tensor | None = None) -> nn.Linear:
    """An ``nn.Linear`` without bias whose weight is ``weight``, or allocated and not initialised
    (the weights are loaded right after: initialising them costs start-up time for nothing)."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    if weight is None:
        weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.register_parameter("bias", None)
    return layer


@dataclasses.dataclass(frozen=True)
class LocalSizes:
    """What one rank holds: its query heads, KV heads, FFN width and vocabulary rows."""

    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_rows: int

    @classmethod
    def whole(cls, args: ModelArgs) -> "LocalSizes":
        return cls(args.n_heads, args.n_kv_heads, args.ffn_dim, args.vocab_size)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype), requires_grad=False)  # loaded next

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., dim]; normalised in float32 like transformers."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half convention: x*cos + cat(-x2, x1)*sin, with the minus sign
    folded into ``signed_sin`` = cat(-sin1, sin2). x [B, T, heads, D]; cos/sin [B, T, 1, D]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., half:], x[..., :half]), dim=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, local: LocalSizes, device=None, dtype=None):
        super().__init__()
        self.n_heads = local.n_heads
        self.n_kv_heads = local.n_kv_heads
        self.head_dim = args.head_dim
        qkv_out = (local.n_heads + 2 * local.n_kv_heads) * args.head_dim
        self.wqkv = linear(args.dim, qkv_out, device, dtype)
        self.wo = linear(local.n_heads * args.head_dim, args.dim, device, dtype)

    def forward(self, x, cos, sin, cache_k, cache_v, rows, positions, mask, length):
        """x [B, T, dim]; cos/sin [B, T, 1, D]; cache_k/v [slots, Hkv, max_len, D];
        rows: slice or index tensor selecting the B cache slots; positions [B, T] (on x's device);
        mask: bool [B, 1, T, L] or None (None = causal over one contiguous row);
        length: int, keys attended to (max position + 1; a host int, so no device sync).
        Returns [B, T, dim] (this rank's partial sum before ``reduce``)."""
        B, T, _ = x.shape
        D = self.head_dim
        H, Hkv = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, D)
        qk = apply_rope(qkv[:, :, : H + Hkv], cos, sin)  # q and k rotated together
        q = qk[:, :, :H].transpose(1, 2)
        k = qk[:, :, H:].transpose(1, 2)
        v = qkv[:, :, H + Hkv :].transpose(1, 2)

        if isinstance(rows, slice):
            keys, values = cache_k[rows], cache_v[rows]
            if T == 1 and B == 1:
                keys[:, :, length - 1 : length] = k
                values[:, :, length - 1 : length] = v
            else:
                row_index = torch.arange(B, device=x.device)[:, None]
                keys[row_index, :, positions] = k.transpose(1, 2).to(keys.dtype)
                values[row_index, :, positions] = v.transpose(1, 2).to(values.dtype)
            keys, values = keys[:, :, :length], values[:, :, :length]
        else:
            cache_k[rows[:, None], :, positions] = k.transpose(1, 2).to(cache_k.dtype)
            cache_v[rows[:, None], :, positions] = v.transpose(1, 2).to(cache_v.dtype)
            keys, values = cache_k[rows, :, :length], cache_v[rows, :, :length]

        if T == 1:
            out = decode_attention(q, keys, values, mask, positions[:, 0] + 1)
        else:
            keys, values = keys.to(q.dtype), values.to(q.dtype)  # no-op unless the cache is float16
            if mask is None:
                out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
            else:
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * D))


def decode_attention(q, keys, values, mask, lengths=None):
    """One query per row: q [B, H, 1, D], keys/values [B, Hkv, L, D], mask bool [B, 1, 1, L] or
    None, lengths int64 [B] (keys each row sees) -> [B, H, 1, D]. On CPU in float32: our AVX2
    kernel (one pass over each KV head's keys and values, shared by its query heads); else two
    small batched matmuls (PyTorch's fused CPU attention costs milliseconds for one query)."""
    B, H, _, D = q.shape
    hkv = keys.shape[1]
    if lengths is not None and q.dtype == torch.float32 and q.device.type == "cpu":
        from .. import kernels

        ext = kernels.get()
        if ext is not None and D % 8 == 0:
            return ext.decode_attention(q.view(B, H, D), keys, values, lengths, D**-0.5).view(B, H, 1, D)
    keys, values = keys.to(q.dtype), values.to(q.dtype)
    qg = q.view(B, hkv, H // hkv, D)
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * (D**-0.5)  # [B, Hkv, G, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, values).view(B, H, 1, D)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, local: LocalSizes, device=None, dtype=None):
        super().__init__()
        self.ffn_dim = local.ffn_dim
        self.w_gate_up = linear(args.dim, 2 * local.ffn_dim, device, dtype)
        self.w_down = linear(local.ffn_dim, args.dim, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim] (partial sum before ``reduce``)."""
        gate, up = self.w_gate_up(x).split(self.ffn_dim, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, local: LocalSizes, device=None, dtype=None):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, device, dtype)
        self.attention = Attention(args, local, device, dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, device, dtype)
        self.feed_forward = FeedForward(args, local, device, dtype)


class Transformer(nn.Module):
    """One rank's LLaMA. ``forward`` runs B rows of T new tokens against the KV cache."""

    def __init__(
        self,
        args: ModelArgs,
        local: LocalSizes | None = None,
        reduce: Reduce = identity,
        gather_vocab: Reduce = identity,
        device=None,
        dtype=torch.float32,
    ):
        super().__init__()
        self.args = args
        self.local = local or LocalSizes.whole(args)
        self.reduce = reduce
        self.gather_vocab = gather_vocab
        # weights are not initialised (they are loaded next): a random normal_ on the meta device
        # alone costs seconds of Python decompositions at start-up
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, device=device, dtype=dtype,
                                           _weight=torch.empty(args.vocab_size, args.dim, device=device, dtype=dtype))
        self.layers = nn.ModuleList(Block(args, self.local, device, dtype) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, device, dtype)
        self.output = linear(args.dim, self.local.vocab_rows, device, dtype)
        self.cache: KVCache | None = None
        # Decode steps through the fused C++ blocks when possible (see model.fused, chosen by the
        # runner); built on the first decode step from the weights then in place, dropped when
        # weights are reloaded or moved.
        self.fused_decode = True
        self.fused = None
        self.register_load_state_dict_post_hook(Transformer._drop_fused)
        # KV cache element type; None = the model's dtype. float16 halves the bytes a decode step
        # reads at long contexts (keys/values are rounded when written, computed in float32).
        self.kv_dtype: torch.dtype | None = None
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _drop_fused(module, incompatible_keys=None) -> None:
        module.fused = None

    def _apply(self, fn, recurse=True):
        self.fused = None
        return super()._apply(fn, recurse)

    def setup_rope(self, device) -> None:
        """Precompute cos/sin ``[max_seq_len, D]`` in float32 as transformers does."""
        inv = rope_inv_freq(self.args).to(device)
        pos = torch.arange(self.args.max_seq_len, device=device, dtype=torch.float32)
        freqs = pos[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        half = inv.shape[0]
        sin = emb.sin()
        self.rope_cos, self.rope_sin = emb.cos(), torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def ensure_cache(self, slots: int, max_len: int) -> KVCache:
        """(Re)allocate the KV cache when it has fewer slots or columns than asked for."""
        c = self.cache
        param = self.norm.weight
        dtype = self.kv_dtype or param.dtype
        if c is None or c.slots < slots or c.max_len < max_len or c.k.dtype != dtype:
            self.cache = None  # free the old buffers before allocating the new ones
            self.cache = KVCache(
                self.args.n_layers, slots, self.local.n_kv_heads, max_len, self.args.head_dim, dtype, param.device
            )
        return self.cache

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        rows: slice | torch.Tensor | None = None,
        last_only: bool = True,
    ) -> torch.Tensor:
        """tokens, positions int64 [B, T]; rows: which cache slots (default slots 0..B-1).
        Positions may stay on the CPU (they are moved here once; the lengths are read from the
        host copy, so a GPU step has no device-to-host sync inside it).

        Within a row, positions must be consecutive; a query at position p sees the row's
        keys at positions <= p. Returns float32 logits [B, 1, vocab] when ``last_only`` (the
        last token of each row), else [B, T, vocab].
        """
        B, T = tokens.shape
        cache = self.cache
        if cache is None or self.rope_cos is None:
            raise RuntimeError("call setup_rope() and ensure_cache() before forward()")
        if rows is None:
            rows = slice(0, B)
        host = positions.cpu()
        length = int(host.max()) + 1
        positions = positions.to(tokens.device)
        mask = None
        if not (B == 1 and int(host[0, 0]) == 0) and not (B == 1 and T == 1):
            key_pos = torch.arange(length, device=tokens.device)
            mask = (key_pos[None, None, :] <= positions[:, :, None]).unsqueeze(1)
        cos = self.rope_cos[positions].unsqueeze(2)
        sin = self.rope_sin[positions].unsqueeze(2)
        if cos.dtype != self.norm.weight.dtype:
            cos, sin = cos.to(self.norm.weight.dtype), sin.to(self.norm.weight.dtype)

        h = self.tok_embeddings(tokens)
        for layer, cache_k, cache_v in zip(self.layers, cache.layer_k, cache.layer_v):
            a = layer.attention(layer.attention_norm(h), cos, sin, cache_k, cache_v, rows, positions, mask, length)
            h = h + self.reduce(a)
            h = h + self.reduce(layer.feed_forward(layer.ffn_norm(h)))
        if last_only:
            h = h[:, -1:, :]
        logits = self.output(self.norm(h))
        return self.gather_vocab(logits).float()
