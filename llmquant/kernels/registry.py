"""Matmul kernels for QuantizedLinear, chosen per device, scheme and number of rows M.

Every kernel computes what `QuantizedLinear.reference_forward` defines (dequantize, then
matmul); `select_kernel` takes the first of FAST_KERNELS that applies, else `DequantMatmul`:
- CPU with AVX-512 VNNI, decode-sized M: llmquant's integer-dot kernels (csrc/cpu_decode_matmul.cpp
  through cpu_ext; LLMQUANT_CPU_KERNELS=0 turns them off): INT4 groups of a multiple of 64 up to
  4 rows, symmetric per-channel INT8 for one row. Activations are rounded to int8 per 64 values
  for weight-only schemes (as llama.cpp does), per token or by the static scale for W8A8.
- CPU, INT4 groups of 32-256 and symmetric per-channel INT8, up to 64 rows: torch's
  `_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm`, fed bf16 activations (their float32
  path is 10-30x slower).
- CUDA: tinygemm `_weight_int4pack_mm` for INT4 groups up to 16 rows; `_scaled_mm` for FP8
  weights with FP8 activations (compute capability 8.9+).
- CPU, INT4 groups of a multiple of 64, more rows (prefill): a compiled dequantization from the
  few-row kernel's packed layout, then `F.linear` (bit-identical to the next line, faster).
- Everything else, and more rows (prefill, perplexity): dequantize to the compute dtype, then
  `F.linear`.
The row limits follow benchmarks/kernels_cpu.py; docs/kernels.md gives the reasons. A fast kernel
is checked once against the dequantize path on a random input when it is prepared; a mismatch or
a missing op (an unexpected torch build) logs a warning and falls back rather than returning
wrong numbers.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from llmquant.kernels import cpu_ext
from llmquant.config.args import FLOAT, FP8_DTYPE, FP8_MAX, INT

log = logging.getLogger(__name__)

INT4_GROUP_SIZES = (32, 64, 128, 256)
CPU_LOWBIT_MAX_ROWS = 64
CPU_INT4_DOT_MAX_ROWS = 4  # our INT4 kernel at or ahead of torch's int4pack up to 4 rows (kernels_cpu.md)
CPU_INT8_DOT_MAX_ROWS = 1  # our INT8 kernel has a fast path for one row only
CUDA_INT4_MAX_ROWS = 16
SELF_CHECK_TOLERANCE = 1e-2  # relative max error; bf16 rounding alone stays well below


class DequantMatmul:
    """Any scheme, any device: dequantize the weight in the compute dtype, then matmul."""

    name = "dequant"
    quantizes_activations = False

    def __init__(self, layer, device: torch.device, dtype: torch.dtype):
        self.layer = layer

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.layer.dequantized_weight(x.dtype))


class Int4DotCpu:
    """INT4 groups x int8 activations on AVX-512 VNNI (cpu_decode_matmul.cpp), up to 4 rows."""

    name = "int4_dot_cpu"
    quantizes_activations = False
    tolerance = 3e-2  # its activations are rounded to int8 per 64 values

    @staticmethod
    def applies(layer, device: torch.device, rows: int) -> bool:
        w = layer.scheme.weights
        return (device.type == "cpu" and rows <= CPU_INT4_DOT_MAX_ROWS and w.type == INT and w.num_bits == 4
                and w.strategy == "group" and w.group_size % 64 == 0 and layer.in_features % w.group_size == 0
                and layer.scheme.input_activations is None and cpu_ext.fast() is not None)

    def __init__(self, layer, device: torch.device, dtype: torch.dtype):
        self.ext = cpu_ext.fast()
        n, k = layer.out_features, layer.in_features
        u = (layer.int_weight().to(torch.int16) + 8).to(torch.uint8).reshape(n, k // 64, 2, 32)
        self.packed = (u[:, :, 0] | (u[:, :, 1] << 4)).contiguous()  # block b: values b*64+j | b*64+32+j
        per_block = layer.scheme.weights.group_size // 64
        scale = layer.weight_scale  # bf16 scales stay bf16 (exact, half the bytes to read per token)
        scale = scale if scale.dtype == torch.bfloat16 else scale.float()
        self.scale = scale.repeat_interleave(per_block, dim=1).contiguous()
        zp = layer.zero_point()  # w = (u - 8 - zp) * scale
        self.offset = None if zp is None else (zp.to(torch.int32) + 8).repeat_interleave(per_block, dim=1).contiguous()

    def __call__(self, x: Tensor) -> Tensor:
        return self.ext.int4_linear(x, self.packed, self.scale, self.offset, None)


class Int4DequantCpu:
    """INT4 groups of a multiple of 64, many rows (prefill): the weight dequantized in one
    compiled pass from the few-row kernel's packed layout (the same bytes, shared with it through
    the layer's kernel cache), then the float matmul. Bit-identical to `DequantMatmul`, whose
    PyTorch-op dequantization cost more than the matmul itself (kernels_cpu.md)."""

    name = "int4_dequant_cpu"
    quantizes_activations = False

    @staticmethod
    def applies(layer, device: torch.device, rows: int) -> bool:
        w = layer.scheme.weights
        return (device.type == "cpu" and rows > CPU_LOWBIT_MAX_ROWS and w.type == INT and w.num_bits == 4
                and w.strategy == "group" and w.group_size % 64 == 0 and layer.in_features % w.group_size == 0
                and layer.scheme.input_activations is None and cpu_ext.fast() is not None)

    def __init__(self, layer, device: torch.device, dtype: torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16):
            raise NotImplementedError(f"no {dtype} output")
        # The few-row kernel's packed bytes when it was prepared (and passed its check); else a
        # layout of our own, not cached under its name, so select_kernel never skips that check.
        packed = layer.kernel_cache.get((Int4DotCpu.name, device, dtype)) or Int4DotCpu(layer, device, dtype)
        self.packed, self.dtype = packed, dtype

    def __call__(self, x: Tensor) -> Tensor:
        p = self.packed
        return F.linear(x, p.ext.int4_dequantize(p.packed, p.scale, p.offset, self.dtype))


class Int8DotCpu:
    """Per-channel INT8 weights x int8 activations on AVX-512 VNNI (cpu_decode_matmul.cpp), one row.
    With the scheme's own INT8 activations (dynamic per token or static per tensor) it computes
    exactly the scheme; for W8A16 it rounds activations per 64 values."""

    name = "int8_dot_cpu"
    tolerance = 3e-2

    @staticmethod
    def applies(layer, device: torch.device, rows: int) -> bool:
        w, a = layer.scheme.weights, layer.scheme.input_activations
        acts_ok = a is None or (a.type == INT and a.num_bits == 8 and a.symmetric
                                and (a.dynamic and a.strategy == "token" or not a.dynamic and a.strategy == "tensor"))
        return (device.type == "cpu" and rows <= CPU_INT8_DOT_MAX_ROWS and w.type == INT and w.num_bits == 8
                and w.symmetric and w.strategy == "channel" and layer.in_features % 64 == 0 and acts_ok
                and cpu_ext.fast() is not None)

    def __init__(self, layer, device: torch.device, dtype: torch.dtype):
        self.ext = cpu_ext.fast()
        self.layer = layer
        q = layer.int_weight()
        self.weight = q.clone(memory_format=torch.contiguous_format)  # aligned memory of our own
        self.scale = layer.weight_scale.float().reshape(-1).contiguous()
        self.wsum = q.to(torch.int32).reshape(q.shape[0], -1, 64).sum(-1, dtype=torch.int32).contiguous()
        act = layer.scheme.input_activations
        self.quantizes_activations = act is not None
        self.mode = self.ext.PER_BLOCK if act is None else self.ext.PER_ROW if act.dynamic else self.ext.STATIC

    def static_scale(self) -> float:
        """The calibrated activation scale for a static scheme (read per call: a state dict
        loaded later changes it), 0 otherwise."""
        return float(self.layer.input_scale) if self.mode == self.ext.STATIC else 0.0

    def __call__(self, x: Tensor) -> Tensor:
        return self.ext.int8_linear(x, self.weight, self.scale, self.wsum, None, self.mode, self.static_scale())


class Int4PackCpu:
    name = "int4pack_cpu"
    quantizes_activations = False

    @staticmethod
    def applies(layer, device: torch.device, rows: int) -> bool:
        w = layer.scheme.weights
        return (device.type == "cpu" and rows <= CPU_LOWBIT_MAX_ROWS and w.type == INT and w.num_bits == 4
                and w.strategy == "group" and w.group_size in INT4_GROUP_SIZES and layer.out_features % 16 == 0
                and layer.in_features % w.group_size == 0)

    def __init__(self, layer, device: torch.device, dtype: torch.dtype):
        self.group = layer.scheme.weights.group_size
        unsigned = (layer.int_weight().to(torch.int32) + 8).contiguous()  # (N, K) in [0, 15]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
        self.scales_and_zeros = _scales_and_zeros(layer, torch.bfloat16)

    def __call__(self, x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), self.packed,
                                                       self.group, self.scales_and_zeros)
        return y.to(x.dtype)


class Int8PackCpu:
    name = "int8pack_cpu"
    quantizes_activations = False

    @staticmethod
    def applies(layer, device: torch.device, rows: int) -> bool:
        w = layer.scheme.weights
        return (device.type == "cpu" and rows <= CPU_LOWBIT_MAX_ROWS and w.type == INT and w.num_bits == 8
                and w.symmetric and w.strategy == "channel")

    def __init__(self, layer, device: torch.device, dtype: torch.dtype):
        # Copies, not the loaded tensors: safetensors memory-maps weights at arbitrary byte
        # offsets, and _weight_int8pack_mm crashed (segmentation fault, AVX-512 CPU, M >= 4 rows)
        # on such a weight; a copy is freshly allocated, aligned memory of our own.
        self.weight = layer.int_weight().clone(memory_format=torch.contiguous_format)  # (N, K) int8
        self.scale = layer.weight_scale.reshape(-1).to(torch.bfloat16, copy=True)

    def __call__(self, x: Tensor) -> Tensor:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.weight, self.scale).to(x.dtype)


class Int4PackCuda:
    name = "int4pack_cuda"
    quantizes_activations = False
    INNER_K_TILES = 8

    @staticmethod
    def applies(layer, device: torch.device, rows: int) -> bool:
        w = layer.scheme.weights
        return (device.type == "cuda" and rows <= CUDA_INT4_MAX_ROWS and w.type == INT and w.num_bits == 4
                and w.strategy == "group" and w.group_size in INT4_GROUP_SIZES
                and layer.out_features % 8 == 0 and layer.in_features % (Int4PackCuda.INNER_K_TILES * 16) == 0)

    def __init__(self, layer, device: torch.device, dtype: torch.dtype):
        self.group = layer.scheme.weights.group_size
        u = (layer.int_weight().to(torch.int32) + 8).to(device)  # (N, K) in [0, 15]
        as_bytes = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)  # two values per byte, even index high
        self.packed = torch.ops.aten._convert_weight_to_int4pack(as_bytes.contiguous(), self.INNER_K_TILES)
        self.scales_and_zeros = _scales_and_zeros(layer, torch.bfloat16).to(device)

    def __call__(self, x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), self.packed, self.group,
                                               self.scales_and_zeros)
        return y.to(x.dtype)


class Fp8ScaledMmCuda:
    """FP8 weights and FP8 activations (static per tensor, or dynamic per token with per-channel
    weights) on the tensor cores. Quantizes its own input: it needs the FP8 values, not the
    dequantized ones."""

    name = "fp8_scaled_mm_cuda"
    quantizes_activations = True

    @staticmethod
    def applies(layer, device: torch.device, rows: int) -> bool:
        s = layer.scheme
        a = s.input_activations
        return (device.type == "cuda" and s.weights.type == FLOAT and a is not None
                and layer.in_features % 16 == 0 and layer.out_features % 16 == 0
                and torch.cuda.get_device_capability(device) >= (8, 9))

    def __init__(self, layer, device: torch.device, dtype: torch.dtype):
        self.layer = layer
        self.weight_t = layer.weight.t()  # (K, N) column-major, as _scaled_mm wants
        w_scale = layer.weight_scale.float()
        self.per_tensor_weight = w_scale.numel() == 1
        self.scale_b = w_scale.reshape(1) if self.per_tensor_weight else w_scale.reshape(1, -1)

    def __call__(self, x: Tensor) -> Tensor:
        act = self.layer.scheme.input_activations
        xf = x.float()
        if act.dynamic:
            scale_a = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        else:
            scale_a = self.layer.input_scale.float().reshape(1)
        rows = x.shape[0]
        pad = (-rows) % 16  # _scaled_mm wants M a multiple of 16
        xq = (xf / scale_a).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        if pad:
            xq = F.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(FP8_DTYPE)
            if scale_a.numel() > 1:
                scale_a = F.pad(scale_a, (0, 0, 0, pad), value=1.0)
        scale_b = self.scale_b
        if scale_a.numel() > 1 and self.per_tensor_weight:
            scale_b = scale_b.expand(1, self.weight_t.shape[1]).contiguous()
        if scale_a.numel() == 1 and not self.per_tensor_weight:
            scale_a = scale_a.expand(xq.shape[0], 1).contiguous()
        y = torch._scaled_mm(xq, self.weight_t, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
        return y[:rows].to(x.dtype)


FAST_KERNELS = (Int4DotCpu, Int8DotCpu, Int4PackCpu, Int4DequantCpu, Int8PackCpu, Int4PackCuda, Fp8ScaledMmCuda)


def _scales_and_zeros(layer, dtype: torch.dtype) -> Tensor:
    """torch's int4pack kernels compute w = (u - 8) * scale + zero with u = q + 8 unsigned, so
    our w = (q - zp) * scale maps to zero = -zp * scale. Shape (K/group, N, 2)."""
    scale = layer.weight_scale.float()  # (N, G)
    zp = layer.zero_point()
    zero = -zp.float() * scale if zp is not None else torch.zeros_like(scale)
    return torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()


def _self_check(kernel, layer, device: torch.device, dtype: torch.dtype, rows: int) -> bool:
    """Compare a freshly prepared kernel with the dequantize path on one random input."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(max(rows, 1), layer.in_features, generator=gen).to(device=device, dtype=dtype)
    with torch.no_grad():
        if not kernel.quantizes_activations and layer.scheme.input_activations is not None:
            from llmquant.quant.primitives import quantize_activation

            x = quantize_activation(x, layer.scheme.input_activations, getattr(layer, "input_scale", None))
        ref = layer.reference_forward(x).float() if kernel.quantizes_activations else \
            F.linear(x.float(), layer.dequantized_weight(torch.float32))
        out = kernel(x).float()
    err = (out - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    return err <= getattr(kernel, "tolerance", SELF_CHECK_TOLERANCE)


def select_kernel(layer, x: Tensor):
    """The kernel for this layer and input (M, K); prepared once per (kernel, device, dtype)."""
    device, dtype, rows = x.device, x.dtype, x.shape[0]
    for cls in FAST_KERNELS:
        if not cls.applies(layer, device, rows):
            continue
        key = (cls.name, device, dtype)
        kernel = layer.kernel_cache.get(key)
        if kernel is None:
            try:
                kernel = cls(layer, device, dtype)
                ok = _self_check(kernel, layer, device, dtype, rows)
            except (RuntimeError, NotImplementedError) as e:  # op missing in this torch build
                ok, reason = False, str(e).splitlines()[0]
            else:
                reason = "its output did not match the reference"
            if not ok:
                log.warning("kernel %s unavailable for %s (%s); using dequantize + matmul",
                            cls.name, layer.extra_repr(), reason)
                kernel = False
            layer.kernel_cache[key] = kernel
        if kernel is not False:
            return kernel
    key = ("dequant", device, dtype)
    if key not in layer.kernel_cache:
        layer.kernel_cache[key] = DequantMatmul(layer, device, dtype)
    return layer.kernel_cache[key]
