"""Prune one weight matrix: magnitude, Wanda or SparseGPT (config/sparsity.py), to a keep-mask.

- magnitude: keep the largest |W| (unstructured: over the whole matrix);
- wanda: keep the largest |W_ij| * ||X_j|| of each output row, where ||X_j|| (the norm of input
  column j over the calibration tokens) is read off the Hessian's diagonal, H_jj = 2/n sum x_j^2;
- sparsegpt: OBS error feedback (GPTQ's column loop, quant/algorithms/gptq.py): column by column,
  the weights it prunes leave an error that the columns not yet visited absorb through the
  inverse Hessian. Masks are chosen as the loop reaches them, on the weights as updated so far:
  per block of columns for unstructured, per M columns for N:M, by w^2 / [H^-1]_jj^2;
- admm: the mask grown gradually while the kept weights are solved for by least squares
  (prune/admm.py): the lowest output error of the four, at a few times SparseGPT's cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmquant.config.sparsity import SparsityConfig
from llmquant.prune.admm import admm_prune
from llmquant.prune.masks import keep_highest, keep_n_of_m
from llmquant.quant.algorithms.gptq import error_feedback, few_threads, inverse_hessian_factor


@dataclass
class PruneResult:
    weight: Tensor  # (out, in) float32: the pruned weight (zeros where keep is False)
    keep: Tensor  # (out, in) bool


def prune_weight(weight: Tensor, hessian: Tensor | None, cfg: SparsityConfig) -> PruneResult:
    """Prune a (out, in) weight; `hessian` (in, in), as GPTQ accumulates it, is needed by wanda
    and sparsegpt."""
    w = weight.detach().float()
    if cfg.needs_data and hessian is None:
        raise ValueError(f"{cfg.method} pruning needs the calibration Hessian")
    if cfg.method == "sparsegpt":
        return _sparsegpt(w, hessian.detach().float().to(w.device), cfg)
    if cfg.method == "admm":
        pruned, keep = admm_prune(w, hessian.detach().float().to(w.device), cfg.fraction, cfg.n_of_m,
                                  iterations=cfg.iterations, dampening=cfg.dampening)
        return PruneResult(weight=pruned, keep=keep)
    if cfg.method == "wanda":
        scores = w.abs() * torch.diag(hessian).float().to(w.device).clamp(min=0).sqrt().unsqueeze(0)
    else:
        scores = w.abs()
    nm = cfg.n_of_m
    keep = keep_n_of_m(scores, *nm) if nm else keep_highest(scores, cfg.fraction, per_row=cfg.method == "wanda")
    return PruneResult(weight=w * keep, keep=keep)


def _sparsegpt(w: Tensor, hessian: Tensor, cfg: SparsityConfig) -> PruneResult:
    out_f, in_f = w.shape
    H = hessian.clone()
    dead = torch.diag(H) == 0  # an input always zero: its weights never reach an output seen
    H[dead, dead] = 1.0
    Hinv = inverse_hessian_factor(H, cfg.dampening)
    d2 = torch.diag(Hinv).pow(2)
    keep = torch.ones(out_f, in_f, dtype=torch.bool, device=w.device)
    pruned = torch.empty_like(w)
    nm = cfg.n_of_m
    step = nm[1] if nm else cfg.block_size

    def prune_column(c: int, col: Tensor, ahead) -> Tensor:
        if c % step == 0:
            n = min(step, in_f - c)
            scores = ahead(n).pow(2) / d2[c:c + n].unsqueeze(0)
            keep[:, c:c + n] = keep_n_of_m(scores, *nm) if nm else keep_highest(scores, cfg.fraction, per_row=False)
        pruned[:, c] = col * keep[:, c]  # the column as the feedback so far left it, pruned
        return pruned[:, c]

    with few_threads(w.device):
        error_feedback(w.clone(), Hinv, cfg.block_size, prune_column)
    return PruneResult(weight=pruned, keep=keep)
