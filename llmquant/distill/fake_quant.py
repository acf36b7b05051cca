"""Quantization-aware training: Linear layers whose forward sees their weights (and, for W8A8 /
FP8 schemes, their input activations) rounded to the scheme's grid, with straight-through
gradients, and an export that quantizes the trained weights with the same grid through
`llmquant.quantize` into a compressed-tensors checkpoint.

The grid is the one `llmquant quantize` uses: the same `QuantArgs`, `weight_qparams` (scales
rounded to their storage dtype) and `quantize`/`dequantize` primitives. QAT uses the `minmax`
observer (the `mse` search costs 100 trial roundings per layer per step); the export is told
the same observer, so the grid the weights trained against is the grid they are stored on.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmquant.errors import InvalidConfigError
from llmquant.config.args import QuantScheme
from llmquant.quant.observers import weight_qparams
from llmquant.quant.primitives import fake_quantize, grouped_view, quantize_activation
from llmquant.quant.pipeline.targets import linear_layers, set_submodule

QAT_OBSERVER = "minmax"


def qat_scheme(scheme: QuantScheme) -> QuantScheme:
    """The scheme with the weight observer QAT trains against."""
    return scheme.replace(weights=dataclasses.replace(scheme.weights, observer=QAT_OBSERVER))


class _STE(torch.autograd.Function):
    """Forward: the rounded value; backward: the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor, rounded: Tensor) -> Tensor:
        return rounded

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def fake_quant_weight(weight: Tensor, scheme: QuantScheme, scale_dtype: torch.dtype) -> Tensor:
    """The weight as the exported checkpoint will hold it (dequantized), with an identity gradient."""
    args = scheme.weights
    with torch.no_grad():
        w = weight.detach().float()
        scale, zero_point = weight_qparams(w, args, scale_dtype)
        rounded = fake_quantize(grouped_view(w, args), scale, zero_point, args).reshape(w.shape).to(weight.dtype)
    return _STE.apply(weight, rounded)


def fake_quant_activation(x: Tensor, scheme: QuantScheme) -> Tensor:
    act = scheme.input_activations
    if act is None:
        return x
    if not act.dynamic:
        raise InvalidConfigError("QAT supports dynamic activation schemes (W8A8, FP8_DYNAMIC); static "
                                 "activation scales are calibrated after training by llmquant quantize.")
    with torch.no_grad():
        rounded = quantize_activation(x.detach(), act)
    return _STE.apply(x, rounded)


class FakeQuantLinear(nn.Linear):
    """An nn.Linear (same parameters, same state_dict names) that trains through the grid."""

    scheme: QuantScheme
    scale_dtype: torch.dtype

    @classmethod
    def wrap(cls, linear: nn.Linear, scheme: QuantScheme, scale_dtype: torch.dtype) -> "FakeQuantLinear":
        linear.__class__ = cls  # keeps the very Parameters the optimizer holds
        linear.scheme, linear.scale_dtype = scheme, scale_dtype
        return linear

    def forward(self, x: Tensor) -> Tensor:
        w = fake_quant_weight(self.weight, self.scheme, self.scale_dtype)
        x = fake_quant_activation(x, self.scheme)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def unwrap(self) -> nn.Linear:
        self.__class__ = nn.Linear
        del self.scheme, self.scale_dtype
        return self


def apply_fake_quant(model: nn.Module, scheme: QuantScheme, *, targets=("Linear",), ignore=("lm_head",),
                     scale_dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Turn the matched Linear layers into FakeQuantLinear in place; returns their names.
    `scale_dtype`: the checkpoint's storage dtype (weight-only scales are stored in it)."""
    scheme = qat_scheme(scheme)
    # As llmquant.quantize stores them: weight-only INT scales in the model's dtype (vLLM reads
    # them so), FP8 and W8A8 scales in float32.
    if scheme.format != "pack-quantized":
        scale_dtype = torch.float32
    names = []
    for name, module in list(linear_layers(model, targets, ignore)):
        if scheme.weights.strategy == "group" and module.in_features % scheme.weights.group_size:
            raise InvalidConfigError(f"{name} has {module.in_features} inputs, not a multiple of group size "
                                     f"{scheme.weights.group_size}; choose a group size that divides it.")
        FakeQuantLinear.wrap(module, scheme, scale_dtype)
        names.append(name)
    if not names:
        raise InvalidConfigError("No Linear layer to train quantization-aware.")
    return names


def remove_fake_quant(model: nn.Module) -> None:
    """Plain nn.Linear layers again (holding the trained weights), ready for llmquant.quantize."""
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            set_submodule(model, name, module.unwrap())
