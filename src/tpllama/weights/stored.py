"""From stored tensors to one rank's ``Transformer``.

The *stored form* of a model is a flat ``name -> tensor`` mapping with HF names: float weights as
``<module>.weight``; a quantized linear layer as ``<module>.qweight`` / ``.scales`` (/ ``.mins``).
``stored_tensors`` streams it from a whole checkpoint (quantizing on the way when asked);
``parallel.plan.slice_for_rank`` cuts it; ``assemble`` builds the model from a rank's slice of it,
fusing q/k/v and gate/up into single matrices.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from ..config import AUTO, ModelArgs
from ..model import quant as quantmod
from ..model.llama import LocalSizes, Transformer, identity, linear
from ..parallel.plan import RankShare, slice_for_rank
from .checkpoint import EMBED, FINAL_NORM, Checkpoint, CheckpointError, expected_shapes, layer_names

def is_linear(name: str) -> bool:
    """True for the weights that are stored quantized: the layers' linear projections.

    The lm_head is stored float (it is usually the tied embedding) and quantized when the model
    is assembled (``int8_head``)."""
    return name.endswith("_proj.weight")


def quantized_linear(ckpt: Checkpoint, name: str, scheme: str):
    """A QuantLinear for ``name``, or None if its shape does not allow one.

    GGUF blocks are imported as they are (no float detour) when they are already of ``scheme``'s
    kind, and Q8_0 blocks are also kept as they are under int4 rather than degraded.
    """
    blocks = ckpt.read_blocks(name)
    if blocks is not None:
        raw, ggml_type = blocks
        kind = "int8" if ggml_type.name == "Q8_0" else "int4"
        if kind == scheme or scheme == AUTO or (kind == "int8" and scheme == "int4"):
            return quantmod.from_gguf_blocks(raw, ggml_type, ckpt.shape(name))
    if scheme == AUTO:
        return None
    weight = ckpt.read(name)
    if weight.shape[1] % quantmod.BLOCK:
        return None
    return quantmod.quantize_weight(weight, scheme)


def stored_tensors(
    ckpt: Checkpoint, dtype: torch.dtype, quant: str | None
) -> Iterator[tuple[str, torch.Tensor, int | None]]:
    """Yield (stored name, whole tensor, in_features for linear layers) one tensor at a time."""
    args = ckpt.args
    for name, shape in expected_shapes(args).items():
        module = name[: -len(".weight")]
        if quant and is_linear(name):
            q = quantized_linear(ckpt, name, quant)
            if q is not None:
                for suffix, t in q.stored_tensors().items():
                    yield f"{module}.{suffix}", t, q.in_features
                continue
        t = ckpt.read(name)
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{ckpt.path}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        yield name, t.to(dtype), (shape[1] if len(shape) == 2 else None)


def rank_slice(ckpt: Checkpoint, share: RankShare, dtype: torch.dtype, quant: str | None) -> dict[str, torch.Tensor]:
    """This rank's stored tensors, sliced in memory from a whole checkpoint."""
    out = {}
    for name, t, in_features in stored_tensors(ckpt, dtype, quant):
        out[name] = slice_for_rank(name, t, share, ckpt.args, in_features).contiguous()
    return out


def _linear(tensors: dict[str, torch.Tensor], module: str):
    """A float weight [out, in] or a QuantLinear for ``module``."""
    if module + ".weight" in tensors:
        return tensors[module + ".weight"]
    parts = {}
    prefix = module + "."
    for key, t in tensors.items():
        if key.startswith(prefix) and "." not in key[len(prefix) :]:
            parts[key[len(prefix) :]] = t
    if not parts:
        raise CheckpointError(f"tensor {module}.weight is missing")
    return quantmod.QuantLinear.from_state(parts)


def _fuse(pieces: list) -> nn.Module:
    """One linear layer computing the concatenation of ``pieces``' outputs."""
    if all(isinstance(p, torch.Tensor) for p in pieces):
        w = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]
        return linear(w.shape[1], w.shape[0], weight=w)
    schemes = {p.scheme if isinstance(p, quantmod.QuantLinear) else None for p in pieces}
    if len(schemes) > 1:  # mixed kinds (e.g. a GGUF with Q4_1 q and Q6_K v): all int8, losing least
        pieces = [
            p if isinstance(p, quantmod.QuantLinear) and p.scheme == "int8"
            else quantmod.quantize_weight(p.dequantize() if isinstance(p, quantmod.QuantLinear) else p, "int8")
            for p in pieces
        ]
    return quantmod.cat_rows(pieces) if len(pieces) > 1 else pieces[0]


def assemble(
    args: ModelArgs,
    share: RankShare,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    reduce: Callable = identity,
    gather_vocab: Callable = identity,
) -> Transformer:
    """Build this rank's model from its stored tensors (consumed: the dict is emptied)."""
    local = LocalSizes(share.n_heads, share.n_kv_heads, share.ffn_dim, share.vocab_rows)
    model = Transformer(args, local, reduce, gather_vocab, device="meta", dtype=dtype)

    def param(t: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)

    def module(layer):
        return layer.to(device) if isinstance(layer, nn.Module) else layer

    model.tok_embeddings.weight = param(tensors.pop(EMBED))
    model.norm.weight = param(tensors.pop(FINAL_NORM))
    for i, block in enumerate(model.layers):
        n = {k: v[: -len(".weight")] for k, v in layer_names(i).items()}
        block.attention_norm.weight = param(tensors.pop(n["attn_norm"] + ".weight"))
        block.ffn_norm.weight = param(tensors.pop(n["ffn_norm"] + ".weight"))
        block.attention.wqkv = module(_fuse([_to(_linear(tensors, n[k]), dtype) for k in ("q", "k", "v")]))
        block.attention.wo = module(_fuse([_to(_linear(tensors, n["o"]), dtype)]))
        block.feed_forward.w_gate_up = module(_fuse([_to(_linear(tensors, n[k]), dtype) for k in ("gate", "up")]))
        block.feed_forward.w_down = module(_fuse([_to(_linear(tensors, n["down"]), dtype)]))
        for k in n.values():
            for key in [key for key in tensors if key.startswith(k + ".")]:
                del tensors[key]
    if args.tie_word_embeddings and not any(k.startswith("lm_head.") for k in tensors):
        start, end = share.vocab
        model.output.weight = nn.Parameter(model.tok_embeddings.weight[start:end], requires_grad=False)
    else:
        model.output = module(_fuse([_to(_linear(tensors, "lm_head"), dtype)]))
    if blocks_quantized(model) and isinstance(model.output, nn.Linear) and args.dim % quantmod.BLOCK == 0:
        model.output = module(int8_head(model.output.weight))
    model.setup_rope(device)
    return model


def blocks_quantized(model: Transformer) -> bool:
    return any(isinstance(m, quantmod.QuantLinear) for m in model.layers.modules())


def int8_head(weight: torch.Tensor) -> quantmod.Int8Linear:
    """The lm_head of a quantized model: int8 weights (blocks of 32, float16 scales; lossless for a
    GGUF Q8_0 embedding, which re-quantizes to the very same blocks) used with float32
    activations. Rounding the activations too flips greedy choices: SmolLM2 answered "What is
    the capital of France?" wrongly with int8 activations, correctly with float ones."""
    head = quantmod.quantize_weight(weight.detach(), "int8")
    head.float_activations = True
    return head


def _to(w, dtype):
    return w.to(dtype) if isinstance(w, torch.Tensor) else w
