"""ADMM pruning (after Boza, "Fast and Effective Weight Update for Pruned Large Language Models",
2024): choose the mask gradually and solve for the kept weights that best reproduce the layer's
outputs on the calibration inputs.

The layer's problem is min ||(W' - W) X||^2 = tr((W' - W) H (W' - W)^T) over W' with the
pruning pattern. SparseGPT answers it greedily, one column at a time, and never revisits a
column's mask. ADMM splits W' into an unconstrained copy V and a pruned copy Z tied by a scaled
dual U, and alternates:

    Z = mask(V + U) * (V + U)          the nearest weight with the pattern
    U = U + V - Z                      the disagreement so far
    V = (W H + rho (Z - U)) (H + rho I)^-1   least squares pulled towards Z

Every V step is one matrix product with a fixed inverse. The mask starts empty and grows to
the target on a cubic schedule over the first `GRADUAL` share of the iterations, each time
keeping the largest |V + U|: weights that the least-squares step keeps pushing up survive.
For N:M every group keeps its N largest from the start, and the rest are pruned gradually,
so the final mask is exactly N:M.

Inputs are scaled to unit second moment first (H_jj = 1; the weights scaled by the inverse),
so |V + U| scores like Wanda's |W| * ||x|| and one rho suits every layer. On the demo model
it ends well below SparseGPT's perplexity at 2:4 and 50% unstructured
(benchmarks/results/sparsity.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmquant.prune.masks import keep_highest, keep_n_of_m

RHO = 1.0  # the penalty tying V to Z, on the unit-scaled Hessian
GRADUAL = 0.75  # the share of the iterations over which the mask grows to the target


def admm_prune(w: Tensor, hessian: Tensor, fraction: float, n_of_m: tuple[int, int] | None, *,
               iterations: int, dampening: float) -> tuple[Tensor, Tensor]:
    """Prune the (out, in) float32 weight `w` on the (in, in) Hessian; returns (pruned, keep)."""
    diag = torch.diag(hessian).clamp(min=0)
    dead = diag == 0  # an input always zero: its weights never matter and are pruned first
    norm = torch.where(dead, torch.ones_like(diag), diag.sqrt())
    eye = torch.eye(len(norm), dtype=w.dtype, device=w.device)
    h = hessian / norm.unsqueeze(0) / norm.unsqueeze(1) + dampening * eye
    alive = (~dead).to(w.dtype).unsqueeze(0)
    target = w * norm  # the weight in unit-scaled coordinates
    wh = target @ h
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h + RHO * eye))
    v, u = target.clone(), torch.zeros_like(target)
    growing = max(1, int(iterations * GRADUAL))
    keep = None
    for t in range(iterations):
        if t < growing:
            progress = 1.0 - (1.0 - (t + 1) / growing) ** 3
            keep = _grow((v + u).abs() * alive, fraction * progress, n_of_m, final=t == growing - 1)
        z = (v + u) * keep
        u += v - z
        v = (wh + RHO * (z - u)) @ inverse
    pruned = (v + u) * keep / norm
    return pruned, keep


def _grow(scores: Tensor, fraction: float, n_of_m: tuple[int, int] | None, *, final: bool) -> Tensor:
    """Keep-mask pruning the `fraction` lowest scores; with N:M, never any group's N highest.
    The final mask counts exactly; the ones on the way use a threshold (a tie may prune one
    weight more), which is 3-4x cheaper than a full top-k and is most of an iteration's time."""
    if n_of_m is not None:
        protected = keep_n_of_m(scores, *n_of_m)
        if final:
            return protected
        scores = scores.masked_fill(protected, float("inf"))
    elif final:
        return keep_highest(scores, fraction, per_row=False)
    k = int(scores.numel() * fraction)
    if k == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    return scores > torch.kthvalue(scores.flatten(), k).values
