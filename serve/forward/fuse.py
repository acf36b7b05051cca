"""Fusing projections that read the same input (q/k/v; gate/up) into one module, one matmul.

Nothing is computed differently: a fused float Linear holds the concatenated weights (the
originals become views of it, so there is one copy in memory), a fused QuantizedLinear the
concatenated quantized values and per-row scales of projections of one scheme (exact: rows are
independent), so the low-bit kernel runs once instead of two or three times.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmquant.quant.linear import QuantizedLinear


class Fused(nn.Module):
    """Several projections of the same input as one module whose output is their concatenation
    (the fallback where their weights cannot be concatenated)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = parts

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def fuse_linears(parts: list[nn.Module]) -> nn.Module:
    """One module computing cat([p(x) for p in parts]) with a single matmul where possible:
    float Linears by concatenating weights, QuantizedLinears of one scheme by concatenating
    their quantized values and per-row scales (exact: rows are independent)."""
    first = parts[0]
    with torch.no_grad():
        if all(type(p) is nn.Linear for p in parts):
            fused = nn.Linear(first.in_features, sum(p.out_features for p in parts),
                              bias=any(p.bias is not None for p in parts),
                              dtype=first.weight.dtype, device=first.weight.device)
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([_bias(p, fused.bias) for p in parts]))
            fused.requires_grad_(False)
            # The original projections become views of the fused weight: one copy in memory.
            row = 0
            for p in parts:
                rows = slice(row, row + p.out_features)
                row += p.out_features
                p.weight = nn.Parameter(fused.weight[rows], requires_grad=False)
                if p.bias is not None:
                    p.bias = nn.Parameter(fused.bias[rows], requires_grad=False)
            return fused
        if all(isinstance(p, QuantizedLinear) for p in parts) and _fusable(parts):
            fused = QuantizedLinear(first.in_features, sum(p.out_features for p in parts), first.scheme,
                                    bias=any(p.bias is not None for p in parts),
                                    scale_dtype=first.weight_scale.dtype,
                                    dtype=first.bias.dtype if first.bias is not None else torch.float32,
                                    device=first.weight_scale.device)
            zps = [p.zero_point() for p in parts]
            fused.set_quantized(torch.cat([p.int_weight() for p in parts]), torch.cat([p.weight_scale for p in parts]),
                                None if zps[0] is None else torch.cat(zps))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([_bias(p, fused.bias) for p in parts]))
            if first.scheme.has_static_activations:
                fused.input_scale.copy_(first.input_scale)
            return fused
    return Fused(parts)


def _bias(p: nn.Module, like: Tensor) -> Tensor:
    return p.bias if p.bias is not None else torch.zeros(p.out_features, dtype=like.dtype, device=like.device)


def _fusable(parts) -> bool:
    first = parts[0]
    w = first.scheme.weights
    if any(p.scheme != first.scheme for p in parts) or w.strategy == "tensor":
        return False
    if any(p.bias is not None for p in parts) and not all(p.bias is not None for p in parts):
        return False
    if first.scheme.has_static_activations:
        return all(torch.equal(p.input_scale, first.input_scale) for p in parts)
    return True
