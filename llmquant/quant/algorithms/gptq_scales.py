"""Choosing GPTQ's integer-grid scales against the layer's *outputs*, not its weights.

GPTQ minimizes the output error tr(dW H dW^T) column by column, but the scales it rounds to are
usually picked from the weights alone (min-max), which treats a weight that meets a large
activation like one that meets nothing. Two pure functions fix that, both with H, the layer's
input second moment (the GPTQ Hessian):

- `hessian_weighted_qparams`: the clipping search of the `mse` observer (shrink the range by
  1.00, 0.99, ... 0.80 per group), scoring each candidate by sum_j H_jj (w_j - Q(w_j))^2: the
  error each input column will actually cause, to first order (llama.cpp's importance-weighted
  scale search does the same with an "imatrix" of the same diagonal).
- `refit_scales`: once the integer codes are chosen, the scales are a linear least-squares
  problem in the full H: for each output row, the group scales s minimizing
  (w - A diag(s)) H (w - A diag(s))^T, with A the codes minus zero points, solve the small
  (groups x groups) system (A_g^T H A_h) s = A_g^T H w. Exact, cheap (one batched solve), and
  never worse on the calibration inputs than the scales it replaces (checked; the old ones are
  kept for any row where the solve does not help). The codes, the format and the kernels are
  unchanged: only the stored scale values move.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmquant.config.args import QuantArgs
from llmquant.quant.observers import shrink_search

_REFIT_RIDGE = 1e-6  # relative to the mean diagonal of each row's normal matrix: keeps it invertible


def hessian_weighted_qparams(view: Tensor, importance: Tensor, args: QuantArgs, scale_dtype: torch.dtype
                             ) -> tuple[Tensor, Tensor | None]:
    """Per-slice scale/zero point for a grouped view (rows, groups, cols) of an INT weight.

    `importance` (groups, cols) is the Hessian diagonal for those columns. Returns (rows, groups)
    tensors like the observers do."""
    weight = importance.float().clamp(min=0).unsqueeze(0)  # (1, groups, cols)
    return shrink_search(view, args, scale_dtype, lambda d: (d.pow(2) * weight).sum(-1))


def output_error(weight: Tensor, approx: Tensor, hessian: Tensor) -> Tensor:
    """Per output row, (w - w~) H (w - w~)^T: the squared output error on the calibration inputs."""
    d = (weight - approx).float()
    return ((d @ hessian.float()) * d).sum(dim=1)


REFIT_MEMORY = 256 * 1024 ** 2  # bytes of the refit's largest temporary, at most


def refit_scales(weight: Tensor, hessian: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor | None,
                 scale_dtype: torch.dtype) -> Tensor:
    """Least-squares group scales for fixed integer codes (see the module docstring).

    weight (out, in) float, hessian (in, in), codes (out, in) integer-valued, scale and
    zero_point (out, groups). Returns new scales (out, groups), float32, rounded to
    `scale_dtype` as stored."""
    out_f, in_f = weight.shape
    groups = scale.shape[1]
    gs = in_f // groups
    # T below holds groups x gs x groups values per row: 6.4 GB for a 3072 x 8192 down_proj in groups
    # of 128, 200 GB for a 70B model's. Rows are independent: above the bound, a slice at a time
    # (below it, one call, as before: a slice's GEMMs may round the last bit differently).
    per_row = groups * gs * groups * 4
    if out_f > 1 and out_f * per_row > REFIT_MEMORY:
        rows = max(1, REFIT_MEMORY // per_row)
        return torch.cat([refit_scales(weight[i:i + rows], hessian, codes[i:i + rows], scale[i:i + rows],
                                       None if zero_point is None else zero_point[i:i + rows], scale_dtype)
                          for i in range(0, out_f, rows)])
    H = hessian.float()
    A = codes.float()
    if zero_point is not None:
        A = A - zero_point.float().repeat_interleave(gs, dim=1)
    A3 = A.reshape(out_f, groups, gs)
    H4 = H.reshape(groups, gs, groups, gs)
    # M[r, g, h] = sum_{i in g, j in h} A[r, i] H[i, j] A[r, j], one (groups x groups) system per row.
    # T (rows, groups, gs, groups): for each row, column i's products with every group h.
    T = torch.einsum("gihj,rhj->rgih", H4, A3)
    M = torch.einsum("rgi,rgih->rgh", A3, T)
    del T
    b = (A3 * (weight.float() @ H).reshape(out_f, groups, gs)).sum(-1)  # (rows, groups)
    ridge = _REFIT_RIDGE * torch.diagonal(M, dim1=-2, dim2=-1).mean(-1).clamp(min=1e-12)
    M = M + ridge[:, None, None] * torch.eye(groups, dtype=M.dtype, device=M.device)
    solved, info = torch.linalg.solve_ex(M, b.unsqueeze(-1))
    new = solved.squeeze(-1)
    # A scale must stay positive (a sign flip would be a different code), and a failed solve
    # keeps the old row.
    ok = (info == 0).unsqueeze(1) & (new > 0) & torch.isfinite(new)
    new = torch.where(ok, new, scale.float())
    new = _round_to_storage(new, scale_dtype)
    # Keep, per row, whichever scales give the smaller output error (rounding to the storage
    # dtype, or a badly conditioned row, could otherwise make it worse).
    def approx(s: Tensor) -> Tensor:
        return (A3 * s.unsqueeze(-1)).reshape(out_f, in_f)

    better = output_error(weight, approx(new), H) < output_error(weight, approx(scale.float()), H)
    return torch.where(better.unsqueeze(1), new, scale.float())


def _round_to_storage(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Nearest representable value in the stored dtype (codes are fixed: no range to keep)."""
    if dtype == torch.float32:
        return scale
    return scale.to(dtype).float()

