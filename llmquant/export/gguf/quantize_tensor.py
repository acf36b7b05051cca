"""One weight into one llama.cpp block type: plainly rounded, or by GPTQ straight onto the type's grid.

`round_to_type` chooses every block's stored scales with the search of scale_search.py and
rounds each weight to the nearest code. `gptq_to_type` runs GPTQ's error feedback
(llmquant/quant/algorithms/gptq.py) with the type's own grid: when the loop reaches a block's
first column, that block's scales (K-quants: the 6-bit sub-block scales and mins and the f16
block scales) are chosen from the weights as the feedback has updated them, with the Hessian's
diagonal as the importance of each column; then every column is rounded onto them and its error
pushed onto the columns not yet rounded. The result is a file of llama.cpp's layout whose codes
were chosen by GPTQ, not rounded after the fact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from llmquant.export.gguf.blocks import dequantize
from llmquant.export.gguf.ggml_types import SYM, BlockParams, GGMLType, round_codes
from llmquant.export.gguf.scale_search import choose_params
from llmquant.quant.algorithms.gptq_scales import refit_scales
from llmquant.quant.algorithms.gptq import DEFAULT_BLOCK_SIZE, DEFAULT_DAMPENING, error_feedback, few_threads, \
    inverse_hessian_factor


@dataclass
class TypedWeight:
    """A (rows, cols) weight in a block type: codes in [0, umax], the stored params, and the
    float32 weights they stand for."""

    type: GGMLType
    codes: Tensor  # (rows, cols) uint8
    params: BlockParams
    dequantized: Tensor  # (rows, cols) float32

    def rows(self, index) -> "TypedWeight":
        """Some rows (a slice or an index tensor), e.g. one layer's share of stacked weights."""
        return TypedWeight(self.type, self.codes[index], self.params.rows(index), self.dequantized[index])


def check_width(weight: Tensor, t: GGMLType, name: str = "weight") -> None:
    if weight.ndim != 2 or weight.shape[1] % t.block:
        raise ValueError(f"{name} of shape {tuple(weight.shape)} cannot be stored as {t.name}: "
                         f"its rows must be a multiple of {t.block} long")


def round_to_type(weight: Tensor, t: GGMLType, importance: Tensor | None = None) -> TypedWeight:
    """Round-to-nearest onto the searched scales; `importance` (cols,) weighs the search."""
    check_width(weight, t)
    rows, cols = weight.shape
    w = weight.detach().float()
    imp = None if importance is None else importance.float().reshape(cols // t.block, t.block)
    params = choose_params(w.reshape(rows, -1, t.block), imp, t)
    scale, offset = params.effective()
    codes = round_codes(w.reshape(rows, -1, t.group), scale.unsqueeze(-1), offset.unsqueeze(-1), t)
    codes = codes.reshape(rows, cols).to(torch.uint8)
    return TypedWeight(t, codes, params, dequantize(codes, params))


def gptq_to_type(weight: Tensor, hessian: Tensor, t: GGMLType, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 dampening: float = DEFAULT_DAMPENING, act_order: bool = True, refit: bool = True) -> TypedWeight:
    """GPTQ onto the type's grid (see the module docstring); hessian (cols, cols) as gptq.py's.

    `act_order` rounds the most active columns first; the scales are then chosen up front, from
    the original weight with the Hessian's diagonal as importance (a block's scales cannot wait for
    its first column when its columns are visited out of order). `refit` then re-solves the f16
    block scales of the symmetric 32-block types (Q4_0, Q5_0, Q8_0) by least squares against the
    full Hessian, for the codes GPTQ chose (gptq_scales.refit_scales; kept per row only where the
    layer's output error drops)."""
    check_width(weight, t)
    W = weight.detach().float().clone()
    rows, cols = W.shape
    H = hessian.detach().float().to(W.device).clone()
    dead = torch.diag(H) == 0  # an input never seen: plain rounding, as in gptq.py
    H[dead, dead] = 1.0
    importance = torch.diag(H)
    H0 = H  # in the original column order, for the refit
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=W.device)
    col_scale = torch.empty(rows, cols, dtype=torch.float32, device=W.device)
    col_offset = torch.empty_like(col_scale)
    parts: list[BlockParams] = []

    def fix(params: BlockParams, start: int, width: int) -> None:
        scale, offset = params.effective()  # (rows, groups)
        col_scale[:, start:start + width] = scale.repeat_interleave(t.group, dim=1)
        col_offset[:, start:start + width] = offset.repeat_interleave(t.group, dim=1)

    perm = None
    if act_order:
        parts.append(choose_params(W.reshape(rows, -1, t.block), importance.reshape(-1, t.block), t))
        fix(parts[0], 0, cols)
        perm = torch.argsort(importance, descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
        col_scale, col_offset = col_scale[:, perm], col_offset[:, perm]
    # One thread: with two, torch's cholesky_inverse of a 1536 x 1536 Hessian took 6.7 s instead of
    # 0.09 s on the (busy) 2-core development machine.
    with few_threads(W.device):
        Hinv = inverse_hessian_factor(H, dampening)

    def round_column(c: int, w: Tensor, ahead) -> Tensor:
        if perm is None and c % t.block == 0:
            block = ahead(t.block).reshape(rows, 1, t.block)
            parts.append(choose_params(block, importance[c:c + t.block].reshape(1, t.block), t))
            fix(parts[-1], c, t.block)
        s, o = col_scale[:, c], col_offset[:, c]
        u = round_codes(w, s, o, t)
        codes[:, c] = u.to(torch.uint8)
        return s * u + o

    with few_threads(W.device):
        error_feedback(W, Hinv, block_size, round_column)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)].contiguous()
    params = BlockParams.concat(parts)
    if refit and t.kind == SYM:
        signed = codes.float() - float(t.center)
        params = BlockParams(t, d=refit_scales(weight.detach().float(), H0, signed, params.d, None, torch.float16))
    return TypedWeight(t, codes, params, dequantize(codes, params))
