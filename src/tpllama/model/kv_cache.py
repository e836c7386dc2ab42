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
        # Per-layer views [slots, Hkv, max_len, D], taken once: ``self.k[i]`` goes through
        # nn.Module's attribute lookup and a tensor select, some 5 us, twice per layer and step.
        self._take_layer_views()

    def _take_layer_views(self) -> None:
        self.layer_k = self.k.unbind(0)
        self.layer_v = self.v.unbind(0)

    def _apply(self, fn, recurse=True):  # .to(), .half(), ... replace the buffers: views follow
        out = super()._apply(fn, recurse)
        self._take_layer_views()
        return out

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]
