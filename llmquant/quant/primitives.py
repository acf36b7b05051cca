"""The math of quantization, as pure functions on tensors.

Conventions (those of compressed-tensors, so vLLM reads our numbers as we meant them):
- integers are signed: int4 in [-8, 7], int8 in [-128, 127];
- quantize:   q = clamp(round(x / scale + zero_point), qmin, qmax)
- dequantize: x = (q - zero_point) * scale       (zero_point absent when symmetric)
- FP8 is E4M3 (max 448): q = fp8(clamp(x / scale, -448, 448)), x = q * scale.

A weight (out, in) is viewed as (rows, groups, cols) so that one scale covers each
[r, g, :] slice: per tensor (1, 1, out*in), per channel (out, 1, in), per group
(out, in/gs, gs). Scales are stored as compressed-tensors stores them: (1,), (out, 1) and
(out, in/gs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmquant.config.args import FLOAT, FP8_DTYPE, FP8_MAX, QuantArgs


def grouped_view(w: Tensor, args: QuantArgs) -> Tensor:
    """(out, in) -> (rows, groups, cols) for the args' strategy."""
    out_f, in_f = w.shape
    if args.strategy == "tensor":
        return w.reshape(1, 1, out_f * in_f)
    if args.strategy == "channel":
        return w.reshape(out_f, 1, in_f)
    if args.strategy == "group":
        return w.reshape(out_f, in_f // args.group_size, args.group_size)
    raise ValueError(f"weights cannot use strategy {args.strategy!r}")


def scale_shape(out_features: int, in_features: int, args: QuantArgs) -> tuple[int, ...]:
    """The stored shape of a weight scale (and zero point) for these args."""
    if args.strategy == "tensor":
        return (1,)
    if args.strategy == "channel":
        return (out_features, 1)
    return (out_features, in_features // args.group_size)


def _as3d(p: Tensor, view: Tensor) -> Tensor:
    return p.reshape(view.shape[0], view.shape[1], 1)


def compute_qparams(lo: Tensor, hi: Tensor, args: QuantArgs) -> tuple[Tensor, Tensor | None]:
    """Scale and zero point that map the range [lo, hi] onto the quantized grid.

    Symmetric grids are [-8, 7] / [-128, 127] times the scale. The scale is the smallest that
    fits both ends without clipping, max(-lo / 8, hi / 7) for INT4: a group whose largest
    magnitude is negative uses the -8 level too (+0.5 dB SQNR on the demo model's INT4
    weights over absmax / 7). The common absmax / 7.5 (half the range) instead rounds the
    largest positive weights past 7, where they are clipped: measurably worse at 8 bits too.
    """
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))  # 0 must be exact
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if args.symmetric:
        scale = torch.maximum(lo / args.qmin, hi / args.qmax)
        zero_point = None
    else:
        scale = (hi - lo) / (args.qmax - args.qmin)
    # An all-zero slice quantizes to 0 under any scale; 1.0 avoids dividing by zero.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not args.symmetric:
        zero_point = torch.clamp(torch.round(args.qmin - lo / scale), args.qmin, args.qmax)
    return scale, zero_point


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, args: QuantArgs) -> Tensor:
    """Quantize a grouped view (rows, groups, cols) -> int8 (integers) or float8_e4m3fn."""
    s = _as3d(scale.float(), x)
    y = x.float() / s
    if args.type == FLOAT:
        return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    if zero_point is not None:
        y = y + _as3d(zero_point.float(), x)
    return torch.clamp(torch.round(y), args.qmin, args.qmax).to(torch.int8)


def fp8_to_float(q: Tensor) -> Tensor:
    """E4M3 -> float32. On CPU, torch's conversion is 4x slower than moving the bits into a
    float16 (sign, then exponent+mantissa shifted by 7) and rescaling by 2^(15-7) for the
    exponent bias, which is exact for every finite E4M3 value, subnormals included."""
    if q.device.type != "cpu":
        return q.float()
    u = q.view(torch.uint8).to(torch.int16)
    half = (((u & 0x80) << 8) | ((u & 0x7F) << 7)).view(torch.float16)
    return half.float() * 256.0


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of `quantize` on a grouped view; returns `dtype`."""
    s = _as3d(scale.float(), q)
    y = fp8_to_float(q) if q.dtype == FP8_DTYPE else q.float()
    if zero_point is not None:
        y = y - _as3d(zero_point.float(), q)
    return (y * s).to(dtype)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None, args: QuantArgs) -> Tensor:
    """quantize then dequantize, same shape and dtype as the grouped view `x`."""
    return dequantize(quantize(x, scale, zero_point, args), scale, zero_point, x.dtype)


def quantize_activation(x: Tensor, args: QuantArgs, static_scale: Tensor | None = None) -> Tensor:
    """Round (M, K) activations to the scheme's grid and return them dequantized.

    Dynamic args take one scale per token (row) from its absmax at run time; static args use
    the calibrated per-tensor scale. Computed in float32 (as vLLM's quantization kernels do),
    then cast back. An INT8/FP8 GEMM on these values gives the same result up to float
    accumulation order, which is why CPU kernels can run the GEMM in float.
    """
    xf = x.float()
    if args.dynamic:
        scale = xf.abs().amax(dim=-1, keepdim=True) / args.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    else:
        scale = static_scale.float()
    y = xf / scale
    if args.type == FLOAT:
        y = y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()
    else:
        y = torch.clamp(torch.round(y), args.qmin, args.qmax)
    return (y * scale).to(x.dtype)


SQNR_CHUNK = 1 << 20  # values per float64 slice: a 8192 x 3072 weight whole took 800 MB of temporaries


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; +6 dB per bit), summed in float64
    a slice of rows at a time (a streamed run's peak memory was this function's temporaries)."""
    ref_rows = reference.reshape(reference.shape[0], -1) if reference.ndim > 1 else reference.reshape(1, -1)
    approx_rows = approx.reshape(ref_rows.shape)
    rows = max(1, SQNR_CHUNK // max(1, ref_rows.shape[1]))
    noise = signal = 0.0
    for ref, app in zip(ref_rows.split(rows), approx_rows.split(rows)):
        ref = ref.double()
        noise += (ref - app.double()).pow_(2).sum().item()
        signal += ref.pow_(2).sum().item()
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item()
