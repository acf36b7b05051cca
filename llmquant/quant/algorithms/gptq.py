"""GPTQ (Frantar et al., 2022) as pure functions on tensors.

A Linear layer computes y = x W^T. Rounding W's columns one at a time, GPTQ pushes each
column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian of
the layer's squared output error, H = 2/n * sum x x^T over the calibration inputs: the later
columns absorb what the earlier ones lost, so the *outputs* on real inputs move far less than
with plain rounding (RTN), at the same bits and the same storage format.

- `accumulate_hessian`: the running mean of 2 x x^T over batches (nothing else is stored).
- `gptq_quantize_weight`: dampening (a fraction of the mean diagonal added to H, so the
  Cholesky factorization exists), the upper Cholesky factor of H^-1, and the error feedback
  done column by column inside blocks of `block_size` columns with one matrix product per
  block for the rest (the "lazy batch" form of the paper: same result, fewer passes over W).
- Group scales (strategy "group") are chosen when the first column of their group is reached,
  from the weights as updated so far: the scale fits the values actually being rounded.
- `act_order` rounds the columns with the largest Hessian diagonal (the most active inputs)
  first, while the most columns remain to absorb their error. The permutation is undone before
  returning, and group scales are then fixed up front from the original weight, one per group
  of *consecutive original* columns ("static groups"): the result is stored exactly like any
  group-quantized weight (no g_idx), so vLLM's standard kernels and transformers load it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from llmquant.config.args import FLOAT, FP8_DTYPE, FP8_MAX, QuantArgs
from llmquant.quant.algorithms.gptq_scales import hessian_weighted_qparams, refit_scales
from llmquant.quant.observers import weight_qparams
from llmquant.quant.primitives import fp8_to_float, grouped_view

DEFAULT_BLOCK_SIZE = 128
DEFAULT_DAMPENING = 0.01
_MAX_DAMPENING_RETRIES = 6  # x10 each: from 1% of the mean diagonal up to 10,000%


def accumulate_hessian(hessian: Tensor | None, count: int, x: Tensor) -> tuple[Tensor, int]:
    """Fold a batch of layer inputs x (..., in) into the running H = 2/n sum x x^T (float32).

    Returns the updated (hessian, count). The mean is kept exact as batches arrive (the old sum
    is rescaled to the new count), so H does not grow with the amount of calibration text.
    Rescaling and adding happen in one addmm (beta, alpha): no scaled copy of the batch and no
    separate pass over H, which were a third of the accumulation's time on the demo model."""
    rows = x.reshape(-1, x.shape[-1]).float()  # (m, in)
    m = rows.shape[0]
    if hessian is None:
        hessian = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32, device=rows.device)
    if m == 0:
        return hessian, count
    total = count + m
    hessian.addmm_(rows.t(), rows, beta=count / total, alpha=2.0 / total)
    return hessian, total


class HessianSum:
    """A running `accumulate_hessian`: `h` (None before any input) over `n` input rows."""

    def __init__(self) -> None:
        self.h: Tensor | None = None
        self.n = 0

    def add(self, x: Tensor) -> None:
        self.h, self.n = accumulate_hessian(self.h, self.n, x)


@dataclass
class GPTQResult:
    q: Tensor  # (out, in) int8 values on the integer grid, or float8_e4m3fn
    scale: Tensor  # float32, shaped as compressed-tensors stores it: (1,), (out, 1) or (out, in/gs)
    zero_point: Tensor | None  # like scale, integer-valued floats; None when symmetric
    dequantized: Tensor  # (out, in) float32: (q - zero_point) * scale
    loss: float  # sum over columns of err^2 / Hinv_ii / 2: GPTQ's own objective


def inverse_hessian_factor(hessian: Tensor, dampening: float) -> Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, raising damp until H + damp I is positive definite."""
    mean_diag = torch.diag(hessian).mean().clamp(min=1e-8)
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = dampening
    for _ in range(_MAX_DAMPENING_RETRIES):
        lower, info = torch.linalg.cholesky_ex(hessian + damp * mean_diag * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        damp *= 10.0
    raise ValueError("the Hessian is not positive definite even after dampening; "
                     "use more calibration samples or a larger dampening")


def _column_args(args: QuantArgs) -> QuantArgs:
    """The args that give one scale per output row over a slice of columns (a group)."""
    return dataclasses.replace(args, strategy="channel", group_size=None)


def _round_column(w: Tensor, scale: Tensor, zero_point: Tensor | None, args: QuantArgs) -> tuple[Tensor, Tensor]:
    """One column (out,) with per-row scale/zero point (out,) -> (stored values, dequantized)."""
    y = w / scale
    if args.type == FLOAT:
        q = y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return q, fp8_to_float(q) * scale
    if zero_point is not None:
        y = y + zero_point
    q = torch.clamp(torch.round(y), args.qmin, args.qmax)
    deq = (q - zero_point) * scale if zero_point is not None else q * scale
    return q.to(torch.int8), deq


@contextlib.contextmanager
def few_threads(device: torch.device):
    """One thread for the column loop on CPU: its hundreds of small vector operations per matrix
    gain nothing from splitting, and with two threads every operation waits on a barrier, which
    on a busy machine made the loop 14-20x slower (measured on the 2-core development machine)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def error_feedback(W: Tensor, Hinv: Tensor, block_size: int,
                   round_column: Callable[[int, Tensor, Callable[[int], Tensor]], Tensor]) -> float:
    """GPTQ's loop over W's (possibly permuted) columns, W updated in place; returns GPTQ's loss.

    `round_column(c, w, ahead)` rounds column c (values w, (out,)) and returns it dequantized;
    it may first call `ahead(n)`, the n columns from c on as they stand now (this block's
    updated ones, then later blocks', which have received every earlier block's feedback), to
    choose the scales of a group that starts at c."""
    in_f = W.shape[1]
    loss = 0.0
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()  # (out, b): this block, updated column by column
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            dq = round_column(i1 + i, w, lambda n, i=i: _ahead(W1, W, i, i2, n))
            err = (w - dq) / Hinv1[i, i]
            W1[:, i:].sub_(err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        loss += float(Err1.pow(2).sum()) / 2.0
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return loss


def _ahead(W1: Tensor, W: Tensor, i: int, i2: int, n: int) -> Tensor:
    """The n columns from this block's column i on: this block's, then the next blocks' (only as
    many as needed: N:M pruning asks for a few columns every few columns)."""
    inside = W1.shape[1] - i
    if n <= inside:
        return W1[:, i:i + n]
    return torch.cat([W1[:, i:], W[:, i2:i2 + n - inside]], dim=1)


def _error_feedback(W: Tensor, Hinv: Tensor, args: QuantArgs, scales: Tensor, zps: Tensor | None,
                    col_group: list[int], gs: int, static: bool, block_size: int, scale_dtype: torch.dtype,
                    stored: Tensor, deq: Tensor, importance: Tensor | None, keep: Tensor | None) -> float:
    """`error_feedback` on our INT/FP8 grids; fills `stored`/`deq` and the dynamic group scales
    in place. Where `keep` is False the weight is pruned: it rounds to the code of exactly zero and
    its whole value is error fed to the columns not yet rounded."""
    col_args = _column_args(args)

    def round_column(c: int, w: Tensor, ahead: Callable[[int], Tensor]) -> Tensor:
        g = col_group[c]
        if keep is not None:
            w = w * keep[:, c]
        if not static and c % gs == 0:
            cols = ahead(gs) if keep is None else ahead(gs) * keep[:, c:c + gs]
            if importance is not None:
                s, z = hessian_weighted_qparams(cols.unsqueeze(1), importance[c:c + gs].unsqueeze(0), args,
                                                scale_dtype)
            else:
                s, z = weight_qparams(cols, col_args, scale_dtype)
            scales[:, g] = s[:, 0].float()
            if zps is not None:
                zps[:, g] = z[:, 0].float()
        q, dq = _round_column(w, scales[:, g], zps[:, g] if zps is not None else None, args)
        stored[:, c] = q
        deq[:, c] = dq
        return dq

    return error_feedback(W, Hinv, block_size, round_column)


def _static_qparams(W: Tensor, H: Tensor, args: QuantArgs, scale_dtype: torch.dtype, weighted: bool
                    ) -> tuple[Tensor, Tensor | None]:
    """Scales fixed before the loop from the original weight: (out, groups), or (1,) per tensor."""
    if weighted and args.strategy != "tensor":
        view = grouped_view(W, args)
        return hessian_weighted_qparams(view, torch.diag(H).reshape(view.shape[1:]), args, scale_dtype)
    return weight_qparams(W, args, scale_dtype)


def gptq_quantize_weight(weight: Tensor, hessian: Tensor, args: QuantArgs, *,
                         block_size: int = DEFAULT_BLOCK_SIZE, dampening: float = DEFAULT_DAMPENING,
                         act_order: bool = False, scale_dtype: torch.dtype = torch.float32,
                         weighted_clipping: bool = False, refit_rounds: int = 0,
                         keep: Tensor | None = None) -> GPTQResult:
    """Quantize a (out, in) weight with GPTQ against the inputs summarized by `hessian` (in, in).

    `args` is the weight's QuantArgs (any strategy: tensor, channel, group; INT4/INT8/FP8) and
    chooses the observer for the scales; scales are rounded to `scale_dtype` as stored.
    `weighted_clipping` picks INT scales by the Hessian-weighted clipping search instead
    (gptq_scales.py). `refit_rounds` > 0 refits the INT scales by least squares on the codes;
    each further round runs GPTQ again with the refitted scales fixed, then refits again.
    `keep` (out, in) bool, from pruning: the weights where it is False stay exactly zero (their
    codes are those of zero) and the others absorb their error, as in SparseGPT."""
    if block_size < 1:
        raise ValueError("block_size must be positive")
    W0 = weight.detach().float().clone()  # (out, in)
    if keep is not None:
        W0 *= keep.to(W0.device)
    out_f, in_f = W0.shape
    H = hessian.detach().float().to(W0.device).clone()
    if H.shape != (in_f, in_f):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match the weight's {in_f} input columns")
    # An input that was always zero gives no information; a unit diagonal keeps H invertible
    # and leaves that column to plain rounding (its error cannot reach any output seen).
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    is_int = args.type != FLOAT
    weighted = weighted_clipping and is_int

    group = args.strategy == "group"
    gs = args.group_size if group else in_f
    n_groups = in_f // gs if group else 1
    scales = torch.empty(out_f, n_groups, dtype=torch.float32, device=W0.device)
    zps = None if args.symmetric or not is_int else torch.empty_like(scales)
    static = not group or act_order
    if static:
        s, z = _static_qparams(W0, H, args, scale_dtype, weighted)  # (1,), (out, 1) or static groups (out, G)
        scales.copy_(s.float().expand(out_f, n_groups) if args.strategy == "tensor" else s.float())
        if zps is not None:
            zps.copy_(z.float().expand(out_f, n_groups) if args.strategy == "tensor" else z.float())

    perm = None
    Hp = H
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        Hp = H[perm][:, perm]
    col_group = ((perm if perm is not None else torch.arange(in_f, device=W0.device)) // gs).tolist()
    Hinv = inverse_hessian_factor(Hp, dampening)
    importance = torch.diag(H) if weighted and not static else None
    refit = refit_rounds > 0 and is_int and args.strategy != "tensor"

    stored = torch.empty(out_f, in_f, dtype=FP8_DTYPE if not is_int else torch.int8, device=W0.device)
    deq = torch.empty(out_f, in_f, dtype=torch.float32, device=W0.device)
    rounds = max(1, refit_rounds) if refit else 1
    for round_index in range(rounds):
        W = W0[:, perm] if perm is not None else W0.clone()
        with few_threads(W0.device):
            loss = _error_feedback(W, Hinv, args, scales, zps, col_group, gs, static or round_index > 0,
                                   block_size, scale_dtype, stored, deq, importance,
                                   None if keep is None else (keep[:, perm] if perm is not None else keep).to(W.device))
        if perm is not None:
            inverse = torch.argsort(perm)
            stored, deq = stored[:, inverse].contiguous(), deq[:, inverse].contiguous()
        if refit:
            scales = refit_scales(W0, H, stored, scales, zps, scale_dtype)
            codes = stored.float() - (zps.repeat_interleave(gs, dim=1) if zps is not None else 0.0)
            deq = codes * scales.repeat_interleave(gs, dim=1)

    if args.strategy == "tensor":
        scale_out, zp_out = scales[:1, 0].reshape(1), (zps[:1, 0].reshape(1) if zps is not None else None)
    else:
        scale_out, zp_out = scales, zps
    return GPTQResult(q=stored.contiguous(), scale=scale_out, zero_point=zp_out, dequantized=deq.contiguous(),
                      loss=loss)
