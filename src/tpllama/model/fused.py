"""Decode steps through the fused C++ layer kernels (``kernels/decode_layer.inc``).

A decode step (one new token per row) through ``Transformer``'s modules costs some forty small
PyTorch operations per layer, which on a small model take longer than reading the weights. When
every linear layer of the blocks is quantized (``tpllama.quant``), the model is float32 on the CPU
and the CPU kernels are available, ``FusedLayers`` runs each block as two C++ calls (attention
half, MLP half) around the same ``reduce`` all-reduces, with the same numerics as the modules'
quantized path up to float rounding order; ``ext.DecodeStack`` runs the whole loop over the blocks
in one call (calling ``reduce`` back between the halves when there is more than one rank).

Shapes: B rows, dim model width; positions and slots int64 [B].
"""

from __future__ import annotations

import torch

from .. import kernels
from .llama import identity
from .quant import QuantLinear


def _packed(layer: QuantLinear, ext):
    b = layer._buffers
    return ext.PackedLinear(b["qpack"], b["spack"], b.get("mpack"), layer.out_features)


class FusedLayers:
    """The model's blocks as ``ext.DecodeLayer`` objects (which hold references to its weights)."""

    def __init__(self, model, ext):
        args = model.args
        self.layers = []
        for block in model.layers:
            att, ffn = block.attention, block.feed_forward
            self.layers.append(ext.DecodeLayer(
                block.attention_norm.weight.detach(), block.ffn_norm.weight.detach(), float(args.norm_eps),
                _packed(att.wqkv, ext), _packed(att.wo, ext), _packed(ffn.w_gate_up, ext), _packed(ffn.w_down, ext),
                att.n_heads, att.n_kv_heads, att.head_dim,
            ))
        self.stack = ext.DecodeStack(self.layers)

    @staticmethod
    def supported(model) -> bool:
        """True when every block can run fused (the kernels themselves are checked per call)."""
        if model.norm.weight.dtype != torch.float32 or not model.norm.weight.is_cpu or model.args.head_dim % 8:
            return False
        return all(
            isinstance(lin, QuantLinear) and lin.qpack.is_cpu
            for block in model.layers
            for lin in (block.attention.wqkv, block.attention.wo, block.feed_forward.w_gate_up, block.feed_forward.w_down)
        )

    def decode_step(self, model, tokens: torch.Tensor, positions: torch.Tensor, rows) -> torch.Tensor:
        """A decode step of ``model`` (tokens, positions int64 [B, 1]; rows: slice or int64 [B] of
        cache slots) through the fused blocks -> float32 logits [B, 1, vocab]."""
        B = tokens.shape[0]
        slots = rows if isinstance(rows, torch.Tensor) else torch.arange(rows.start, rows.start + B)
        h = self(model.tok_embeddings(tokens[:, 0]), model.rope_cos, model.rope_sin, model.cache,
                 slots.contiguous(), positions[:, 0].contiguous(), model.reduce)
        return model.gather_vocab(model.output(model.norm(h)).unsqueeze(1)).float()

    def __call__(self, h: torch.Tensor, rope_cos, rope_sin, cache, slots: torch.Tensor, positions: torch.Tensor,
                 reduce) -> torch.Tensor:
        """h float32 [B, dim] (the embeddings) -> the residual stream after the last block [B, dim]."""
        return self.stack.run(h, rope_cos, rope_sin, cache.layer_k, cache.layer_v, slots, positions,
                              None if reduce is identity else reduce)


def fused_layers(model) -> FusedLayers | None:
    """The model's ``FusedLayers`` (built on first use), or None when it cannot or should not run
    fused (``model.fused_decode`` False, kernels unavailable or disabled, unsupported layers)."""
    if not model.fused_decode:
        return None
    ext = kernels.get()
    if ext is None:
        return None
    if model.fused is None:
        model.fused = FusedLayers(model, ext) if FusedLayers.supported(model) else False
    return model.fused or None
