"""A quantized Linear whose quantization parameters train, and only those the checkpoint format
can hold: the integer (or FP8) codes stay fixed, while the scales, the zero points and, when
asked, a bounded rounding offset per integer code learn (self-distillation, self_distill.py).

Forward, for integer schemes (grouped view (rows, groups, cols), as primitives.py):
    codes  = clamp(q + round(clamp(v, -1, 1)), qmin, qmax)    v: rounding offset, 0 at start
    zero   = clamp(round(z), qmin, qmax)                       z: the zero point, a float while training
    scale  = as_stored(scale0 * exp(c))                        c: the log of the scale's change, 0 at start
    weight = (codes - zero) * scale
Every rounding passes its gradient straight through (STE), as AdaRound / AutoRound / EfficientQAT
train. FP8 weights: weight = fp8_codes * scale (the codes are floats with no rounding offset).
The scale is trained in log space so that one learning rate is a relative step for every layer,
whatever its weights' magnitude (and starts at exactly the stored value: exp(0) = 1). `export()` rounds every parameter to what the checkpoint stores
and returns a QuantizedLinear: same scheme, same layout, the same numbers the forward used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmquant.config.args import FLOAT
from llmquant.errors import InvalidConfigError
from llmquant.quant.linear import QuantizedLinear
from llmquant.quant.primitives import fp8_to_float, grouped_view, quantize_activation

ROUNDING_BOUND = 1.0  # an integer code moves by at most one step from where quantization put it


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad


class _CastSTE(torch.autograd.Function):
    """x rounded to `dtype` and back (the stored scale), identity gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype) -> Tensor:
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _ActivationSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, args, static_scale) -> Tensor:
        return quantize_activation(x, args, static_scale)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None


class LearnableQuantLinear(nn.Module):
    """Built from a QuantizedLinear (`from_quantized`); `train_parts` from config/self_distill.TRAINABLE."""

    def __init__(self, layer: QuantizedLinear, train_parts: tuple[str, ...]):
        super().__init__()
        self.scheme, self.in_features, self.out_features = layer.scheme, layer.in_features, layer.out_features
        args = layer.scheme.weights
        self.is_float = args.type == FLOAT
        self.scale_dtype = layer.weight_scale.dtype
        if self.is_float and "rounding" in train_parts:
            raise InvalidConfigError("FP8 weights have no integer codes to round differently: drop 'rounding' from "
                                     "self_distill.train for FP8 schemes (scales and norms still train).")
        q = layer.int_weight()
        # FP8 codes as float32 (exact); integer codes as int8.
        self.register_buffer("codes", fp8_to_float(q) if self.is_float else q.to(torch.int8))
        self.register_buffer("base_scale", layer.weight_scale.detach().float().clone())
        self.log_scale_change = nn.Parameter(torch.zeros_like(self.base_scale), requires_grad="scales" in train_parts)
        zp = layer.zero_point()
        self.zero_point = None if zp is None else nn.Parameter(
            zp.float(), requires_grad="zero_points" in train_parts)
        self.rounding = nn.Parameter(torch.zeros(q.shape, dtype=torch.float32)) if "rounding" in train_parts else None
        if getattr(layer, "input_scale", None) is not None:
            self.register_buffer("input_scale", layer.input_scale.detach().clone())
        else:
            self.input_scale = None
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    # ---- what the forward computes, and what export stores -----------------------------------
    def integer_codes(self) -> Tensor:
        """The codes with the rounding offsets applied, as floats (STE), shape (out, in)."""
        args = self.scheme.weights
        q = self.codes.float()
        if self.rounding is not None:
            q = q + _RoundSTE.apply(self.rounding.clamp(-ROUNDING_BOUND, ROUNDING_BOUND))
            q = q.clamp(args.qmin, args.qmax)
        return q

    def zero_points(self) -> Tensor | None:
        if self.zero_point is None:
            return None
        args = self.scheme.weights
        return _RoundSTE.apply(self.zero_point).clamp(args.qmin, args.qmax)

    def scales(self) -> Tensor:
        return _CastSTE.apply(self.base_scale * self.log_scale_change.exp(), self.scale_dtype)

    def weight(self) -> Tensor:
        """The dequantized weight the checkpoint will hold, (out, in) float32, differentiable."""
        args = self.scheme.weights
        codes = self.codes if self.is_float else self.integer_codes()
        view = grouped_view(codes, args)  # (rows, groups, cols)
        scale = self.scales().reshape(view.shape[0], view.shape[1], 1)
        zero = self.zero_points()
        if zero is not None:
            view = view - zero.reshape(view.shape[0], view.shape[1], 1)
        return (view * scale).reshape(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        act = self.scheme.input_activations
        if act is not None:
            x = _ActivationSTE.apply(x, act, self.input_scale)
        w = self.weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def export(self) -> QuantizedLinear:
        """A QuantizedLinear holding the trained parameters as the checkpoint stores them."""
        bias_dtype = self.bias.dtype if self.bias is not None else torch.float32
        layer = QuantizedLinear(self.in_features, self.out_features, self.scheme, bias=self.bias is not None,
                                scale_dtype=self.scale_dtype, dtype=bias_dtype, device=self.log_scale_change.device)
        if self.is_float:
            from llmquant.config.args import FP8_DTYPE

            q = self.codes.to(FP8_DTYPE)
        else:
            q = self.integer_codes().round().to(torch.int8)
        zero = self.zero_points()
        layer.set_quantized(q, (self.base_scale * self.log_scale_change.exp()).to(self.scale_dtype),
                            None if zero is None else zero.round().to(torch.int8))
        if self.input_scale is not None:
            layer.input_scale.copy_(self.input_scale)
        if self.bias is not None:
            layer.bias.data.copy_(self.bias)
        return layer

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by kind: "scales" (relative lr) and "codes" (zero points and rounding,
        in units of one integer step)."""
        out = {"scales": [], "codes": []}
        if self.log_scale_change.requires_grad:
            out["scales"].append(self.log_scale_change)
        if self.zero_point is not None and self.zero_point.requires_grad:
            out["codes"].append(self.zero_point)
        if self.rounding is not None:
            out["codes"].append(self.rounding)
        return out

    def changed_codes(self) -> int:
        """How many integer codes the rounding offsets moved (0 without `rounding`)."""
        if self.rounding is None:
            return 0
        with torch.no_grad():
            return int((self.integer_codes().round() != self.codes.float()).sum())

    def extra_repr(self) -> str:
        trained = [n for n, p in (("scales", self.log_scale_change), ("zero_points", self.zero_point),
                                  ("rounding", self.rounding)) if p is not None and p.requires_grad]
        return f"in_features={self.in_features}, out_features={self.out_features}, trains={trained}"
