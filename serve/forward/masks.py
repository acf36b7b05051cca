"""Attention masks for the lean forward, built once per step (per distinct sliding window), not per layer.

The engine's rows are right-aligned (left padding only), so a cache column is a position and a
sliding window is a distance in columns, as transformers' sliding_window_overlay measures it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attention_mask(mask: Tensor | None, batch: int, length: int, past: int, device,
                   window: int | None = None) -> Tensor | None:
    """Boolean (B, 1, T, past + T): key j visible to query t if it is a real token, not in the
    future and, with a sliding `window`, less than `window` columns back. None when plain causal
    attention (or a single new token with no padding) is exact."""
    total = mask.shape[1] if mask is not None else past + length
    if window is not None and total <= window:
        window = None  # nothing is that far back yet
    if mask is None and window is None and (length == 1 or past == 0):
        return None
    keys = torch.arange(total, device=device)[None, :]
    queries = (total - length + torch.arange(length, device=device))[:, None]
    visible = keys <= queries  # (T, L)
    if window is not None:
        visible = visible & (keys > queries - window)
    if mask is None:
        return visible[None, None].expand(batch, 1, length, total)
    return mask.bool()[:, None, None, :] & visible[None, None]


def decode_key_mask(mask: Tensor | None, batch: int, total: int, device, window: int | None) -> Tensor | None:
    """(B, total) bool, the keys one new token (the last column) may see: `mask`'s real tokens,
    within `window` of it when there is one. None (all of them) where `mask` is None and the
    window does not reach back that far."""
    if window is None or total <= window:
        return mask
    recent = torch.arange(total, device=device) >= total - window  # (L,) distance total - 1 - j < window
    return recent.expand(batch, total) if mask is None else mask.bool() & recent
