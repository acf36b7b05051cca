"""What a GGUF file is made from: each checkpoint tensor of a loaded model, float or quantized.

A model loaded by llmquant holds either float weights or our `QuantizedLinear` layers (a
compressed-tensors folder). `model_tensors` lists every tensor the file must hold under its
checkpoint name, in order; `lossless_type` says which of our quantized layouts a llama.cpp type
holds exactly (codes carried over, only the scales' storage becomes f16), and `carry_over` builds
that typed weight from the layer's codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmquant.config.args import INT
from llmquant.export.gguf.blocks import dequantize
from llmquant.export.gguf.ggml_types import BlockParams, as_f16, block_type
from llmquant.export.gguf.quantize_tensor import TypedWeight
from llmquant.quant.linear import QuantizedLinear

# (bits, symmetric) of our INT weights in groups of 32 -> the llama.cpp type with that exact grid
_LOSSLESS = {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}
HOLDABLE = "INT4 symmetric (Q4_0) or asymmetric (Q4_1), or INT8 symmetric (Q8_0), in groups of 32"


@dataclass
class SourceTensor:
    name: str  # checkpoint name, e.g. model.layers.0.self_attn.q_proj.weight
    tensor: Tensor | None  # float tensors
    layer: QuantizedLinear | None = None  # quantized weights

    @property
    def shape(self) -> tuple[int, ...]:
        if self.layer is not None:
            return (self.layer.out_features, self.layer.in_features)
        return tuple(self.tensor.shape)


def model_tensors(model: nn.Module) -> list[SourceTensor]:
    """Every tensor of the model's checkpoint: float parameters and persistent buffers by name,
    and each QuantizedLinear's weight once (as `<layer>.weight`) instead of its packed buffers."""
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    out: list[SourceTensor] = []
    seen: set[str] = set()
    for key, value in model.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        if owner in quantized:
            if leaf == "bias":
                out.append(SourceTensor(key, value.detach()))
            elif owner not in seen:
                seen.add(owner)
                out.append(SourceTensor(f"{owner}.weight", None, quantized[owner]))
            continue
        out.append(SourceTensor(key, value.detach()))
    return out


def lossless_type(layer: QuantizedLinear) -> str | None:
    """The llama.cpp type that holds this layer's codes exactly, or None."""
    w = layer.scheme.weights
    if w.type != INT or w.strategy != "group" or w.group_size != 32:
        return None
    return _LOSSLESS.get((w.num_bits, w.symmetric))


def carry_over(layer: QuantizedLinear) -> tuple[TypedWeight, float, int]:
    """The layer's codes in its lossless type; returns (typed weight, largest relative change of a
    scale or offset from storing it as f16, how many codes had to move). Only INT8's -128 moves (to
    -127): llama.cpp's Q8_0 kernels cannot compute it (ggml_types.GGMLType.umin)."""
    t = block_type(lossless_type(layer))
    q = layer.int_weight().to(torch.int16)  # signed codes
    scale = layer.weight_scale.float()
    d = as_f16(scale)
    change = _relative_change(scale, d)
    if t.kind == "affine":
        zero = layer.zero_point().float()
        offset = -scale * (zero + float(t.center))  # w = s (q - z) = s u - s (z + 8), u = q + 8
        m = as_f16(offset)
        change = max(change, _relative_change(offset, m, scale))
        params = BlockParams(t, d=d, m=m)
    else:
        params = BlockParams(t, d=d)
    unsigned = q + t.center
    moved = int((unsigned < t.umin).sum())
    codes = unsigned.clamp(min=t.umin).to(torch.uint8)
    return TypedWeight(t, codes, params, dequantize(codes, params)), change, moved


def _relative_change(before: Tensor, after: Tensor, relative_to: Tensor | None = None) -> float:
    ref = (before if relative_to is None else relative_to).abs().clamp(min=1e-30)
    return float(((after - before).abs() / ref).max()) if before.numel() else 0.0
