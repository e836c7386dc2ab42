"""The seed's input contract: ``input_ids`` int64 [B, S] and an optional ``attention_mask``
(the seed's float32 additive [B, 1, S, S], or the usual 0/1 [B, S]), checked before any rank
sees them; padding is removed row by row."""

from __future__ import annotations

import torch

MASKED_BELOW = -1e4  # additive mask values <= this count as "masked"


def rows_from_inputs(input_ids, attention_mask) -> tuple[torch.Tensor, list[list[int]]]:
    """Validate the seed's I/O contract; returns (input_ids [B, S] int64, each row's real tokens)."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids
    else:
        try:
            ids = torch.tensor(input_ids)
        except (TypeError, ValueError, OverflowError, RuntimeError) as err:
            raise ValueError(f"input_ids must be a rectangular [batch, seq] array of integers: {err}") from None
    if ids.numel() == 0:
        raise ValueError(f"input_ids must have shape [batch, seq] with batch, seq >= 1, got {tuple(ids.shape)}")
    if ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"input_ids must hold integers (int64), got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None, :]
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [batch, seq] with batch, seq >= 1, got {tuple(ids.shape)}")
    ids = ids.to(torch.int64).cpu()
    B, S = ids.shape
    keep = torch.ones(B, S, dtype=torch.bool)
    if attention_mask is not None:
        keep = mask_to_keep(attention_mask, B, S)
    return ids, [ids[b][keep[b]].tolist() for b in range(B)]


def mask_to_keep(mask, B: int, S: int) -> torch.Tensor:
    """bool [B, S]: which tokens are real, from a 2-D 0/1 mask or the seed's 4-D additive mask."""
    if not isinstance(mask, torch.Tensor):
        mask = torch.as_tensor(mask)
    if mask.dim() == 2:
        if tuple(mask.shape) != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected [batch, seq] = [{B}, {S}] or [{B}, 1, {S}, {S}]")
        values = mask.float()
        if not bool(((values == 0) | (values == 1)).all()):
            raise ValueError("a 2-D attention_mask must hold only 0 (padding) and 1 (token)")
        return values.bool()
    if mask.dim() == 4:
        if tuple(mask.shape) != (B, 1, S, S):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected [{B}, 1, {S}, {S}] (or 2-D [{B}, {S}])")
        if mask.dtype != torch.float32:
            raise ValueError(f"a 4-D attention_mask must be float32 (additive: 0 = attend, large negative = masked), got {mask.dtype}")
        m = mask[:, 0]
        attend = m == 0
        masked = m <= MASKED_BELOW
        if not bool((attend | masked).all()) or bool(torch.isnan(m).any()):
            raise ValueError(
                f"a 4-D attention_mask must hold 0.0 (attend) or a large negative number <= {MASKED_BELOW:g} / -inf (masked)"
            )
        keep = attend[:, -1, :]  # the last query sees every real token
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        expected = causal[None] & keep[:, None, :]
        real_queries = keep[:, :, None].expand(B, S, S)
        if not bool((attend[real_queries] == expected[real_queries]).all()):
            raise ValueError(
                "the 4-D attention_mask is not a causal mask with padding (as transformers' LLaMA builds); "
                "other attention patterns are not supported"
            )
        return keep
    raise ValueError(f"attention_mask must be 2-D [batch, seq] or 4-D [batch, 1, seq, seq], got {mask.dim()}-D")
