"""Which weights to keep, from a score per weight (higher = more important): unstructured
(lowest scores over a whole matrix, or per output row) and N:M (the N highest of every M
consecutive input columns, per row: the layout 2:4 sparse tensor cores read)."""

from __future__ import annotations

import torch
from torch import Tensor


def keep_highest(scores: Tensor, fraction_pruned: float, *, per_row: bool) -> Tensor:
    """Bool mask, False for the `fraction_pruned` lowest scores (of each row when `per_row`)."""
    if per_row:
        k = int(scores.shape[-1] * fraction_pruned)
        if k == 0:
            return torch.ones_like(scores, dtype=torch.bool)
        lowest = torch.topk(scores, k, dim=-1, largest=False).indices
        keep = torch.ones_like(scores, dtype=torch.bool)
        return keep.scatter_(-1, lowest, False)
    k = int(scores.numel() * fraction_pruned)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        keep[torch.topk(scores.flatten(), k, largest=False).indices] = False
    return keep.view_as(scores)


def keep_n_of_m(scores: Tensor, n: int, m: int) -> Tensor:
    """Bool mask keeping the n highest scores in every m consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input columns are not a multiple of {m} ({n}:{m} sparsity)")
    grouped = scores.reshape(rows, cols // m, m)
    top = torch.topk(grouped, n, dim=-1).indices
    keep = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(rows, cols)


def follows_n_of_m(nonzero: Tensor, n: int, m: int) -> bool:
    """Whether at most n of every m consecutive entries of each row are nonzero."""
    rows, cols = nonzero.shape
    return cols % m == 0 and bool((nonzero.reshape(rows, cols // m, m).sum(-1) <= n).all())


def zero_masks(model, min_fraction: float = 0.25) -> list:
    """(weight, keep) for every weight matrix of `model` of which at least `min_fraction` is
    exactly zero: a pruned model's masks (a trained dense weight has next to no exact zeros).
    Embeddings and the output layer are left out: pruning never targets them by default."""
    out = []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embed" in name or name.startswith("lm_head"):
            continue
        keep = p.detach() != 0
        if (~keep).float().mean() >= min_fraction:
            out.append((p, keep))
    return out
