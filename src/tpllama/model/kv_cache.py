"""The KV cache: static key/value buffers of slots, one sequence per slot."""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Static key/value buffers: ``[slots, Hkv, max_len, D]`` per layer, zero-initialised.

    Each slot holds one sequence; its token at position p sits in column p.
    """

    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (n_layers, slots, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]
