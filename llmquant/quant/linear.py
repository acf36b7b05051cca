"""QuantizedLinear: a Linear layer whose weight stays quantized in memory.

Its buffers are exactly the compressed-tensors tensors of one layer, under the names vLLM
reads (`weight_packed`/`weight_shape` for pack-quantized INT4/INT8, `weight` int8/fp8 for
int-/float-quantized, `weight_scale`, `weight_zero_point`, `input_scale`), so the model's
state_dict *is* the checkpoint and loading is `load_state_dict`. Matmuls go through a kernel
chosen per device and batch size (llmquant/kernels/registry.py); kernel-specific layouts are derived once and
cached, never saved.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmquant.config.args import FP8_DTYPE, QuantScheme
from llmquant.quant.observers import weight_qparams
from llmquant.quant.packing import pack_int32, unpack_int32
from llmquant.quant.primitives import dequantize, grouped_view, quantize, quantize_activation, scale_shape


ROUND_CHUNK = 1 << 21  # weight values rounded at once in from_float


class QuantizedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, *, bias: bool = False,
                 scale_dtype: torch.dtype = torch.float32, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        w = scheme.weights
        s_shape = scale_shape(out_features, in_features, w)
        empty = dict(device=device)
        if scheme.format == "pack-quantized":
            words = math.ceil(in_features * w.num_bits / 32)
            self.register_buffer("weight_packed", torch.empty(out_features, words, dtype=torch.int32, **empty))
            self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
            if not w.symmetric:
                zp_rows = math.ceil(out_features * w.num_bits / 32)
                self.register_buffer("weight_zero_point",
                                     torch.empty(zp_rows, s_shape[1], dtype=torch.int32, **empty))
        else:
            storage = FP8_DTYPE if scheme.format == "float-quantized" else torch.int8
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=storage, **empty))
            if not w.symmetric:
                self.register_buffer("weight_zero_point", torch.empty(s_shape, dtype=torch.int8, **empty))
        self.register_buffer("weight_scale", torch.empty(s_shape, dtype=scale_dtype, **empty))
        if scheme.has_static_activations:
            self.register_buffer("input_scale", torch.empty(1, dtype=torch.float32, **empty))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, **empty), requires_grad=False) if bias else None
        # Derived layouts, keyed by (kernel, device, dtype); never saved. Public: the kernel
        # registry fills it, and a forward that fused this layer's projections away clears it.
        self.kernel_cache: dict = {}

    # ---- building from a float layer --------------------------------------------------------
    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: QuantScheme, *, scale_dtype: torch.dtype,
                   input_scale: float | None = None) -> "QuantizedLinear":
        """Quantize `linear`'s weight with the scheme's weight observer."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, scheme, bias=linear.bias is not None,
                    scale_dtype=scale_dtype, dtype=weight.dtype, device=weight.device)
        args = scheme.weights
        scale, zero_point = weight_qparams(weight, args, scale_dtype)
        if scale.shape[0] == weight.shape[0]:
            # Rounding is elementwise: a slice of rows at a time gives the same codes, with a few MB of
            # float temporaries instead of three copies of the weight in float32.
            rows = max(1, ROUND_CHUNK // max(1, weight.shape[1]))
            q = torch.cat([quantize(grouped_view(weight[i:i + rows].float(), args), scale[i:i + rows],
                                    None if zero_point is None else zero_point[i:i + rows], args
                                    ).reshape(-1, weight.shape[1]) for i in range(0, weight.shape[0], rows)])
        else:  # one scale for the whole tensor
            q = quantize(grouped_view(weight.float(), args), scale, zero_point, args).reshape(weight.shape)
        layer.set_quantized(q, scale, zero_point)
        if layer.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        if scheme.has_static_activations:
            if input_scale is None:
                raise ValueError("a static activation scheme needs the calibrated input_scale")
            layer.input_scale.fill_(input_scale)
        return layer

    def set_quantized(self, q: Tensor, scale: Tensor, zero_point: Tensor | None) -> None:
        """Store quantized values (int8 or fp8, shape (out, in)) and their qparams."""
        w = self.scheme.weights
        if self.scheme.format == "pack-quantized":
            self.weight_packed = pack_int32(q, w.num_bits)
            if zero_point is not None:
                self.weight_zero_point = pack_int32(zero_point.to(torch.int8), w.num_bits, packed_dim=0)
        else:
            self.weight = q
            if zero_point is not None:
                self.weight_zero_point = zero_point.to(torch.int8)
        self.weight_scale = scale.to(self.weight_scale.dtype)
        self.kernel_cache.clear()

    # ---- reading back -----------------------------------------------------------------------
    def int_weight(self) -> Tensor:
        """Quantized values as a (out, in) int8 tensor (integer schemes) or float8 (FP8)."""
        if self.scheme.format == "pack-quantized":
            return unpack_int32(self.weight_packed, self.scheme.weights.num_bits,
                                (self.out_features, self.in_features))
        return self.weight

    def zero_point(self) -> Tensor | None:
        """Unpacked zero points shaped like weight_scale, or None when symmetric."""
        if self.scheme.weights.symmetric:
            return None
        if self.scheme.format == "pack-quantized":
            return unpack_int32(self.weight_zero_point, self.scheme.weights.num_bits,
                                tuple(self.weight_scale.shape), packed_dim=0)
        return self.weight_zero_point

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        args = self.scheme.weights
        q = grouped_view(self.int_weight(), args)
        return dequantize(q, self.weight_scale, self.zero_point(), dtype).reshape(self.out_features, self.in_features)

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        from llmquant.kernels.registry import select_kernel

        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        kernel = select_kernel(self, x2)
        act = self.scheme.input_activations
        if act is not None and not kernel.quantizes_activations:
            # Rounded to the activation grid, then dequantized: a float GEMM on these values
            # equals the INT8/FP8 GEMM up to accumulation order.
            x2 = quantize_activation(x2, act, getattr(self, "input_scale", None))
        y = kernel(x2)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def reference_forward(self, x: Tensor) -> Tensor:
        """Dequantize-then-matmul in float32: the definition every kernel is tested against."""
        x2 = x.reshape(-1, self.in_features).float()
        act = self.scheme.input_activations
        if act is not None:
            x2 = quantize_activation(x2, act, getattr(self, "input_scale", None))
        y = F.linear(x2, self.dequantized_weight(torch.float32),
                     self.bias.float() if self.bias is not None else None)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    # Quantized tensors and their scales keep their storage dtype through model.to(dtype) or
    # .half(): casting an FP8 weight or a float32 scale would silently change the numbers.
    # Device moves still apply (probed on an empty tensor).
    def _apply(self, fn, recurse=True):
        buffers = dict(self._buffers)
        self._buffers.clear()
        super()._apply(fn, recurse)
        for name, buf in buffers.items():
            if buf is not None:
                device = fn(torch.empty(0, dtype=buf.dtype, device=buf.device)).device
                buf = buf.to(device)
            self._buffers[name] = buf
        self.kernel_cache.clear()
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.scheme.describe()}")
