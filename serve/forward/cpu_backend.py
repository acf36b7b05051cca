"""The lean forward's steps as compiled CPU kernels (llmquant/kernels/csrc), and its decode steps in C++.

At batch 1 a 135M-parameter model's decode step on two cores has about 10 ms of arithmetic
and memory traffic, so every PyTorch op that is not a matmul (a few microseconds each, some 40
per layer) matters as much as the kernels. `CpuSteps` runs each step of the lean forward's
layer loop (lean.py) as one compiled call:

    add_rms_norm_(x, delta, ln)         residual add + RMSNorm, one pass
    rope_(qkv)                          rotary embedding in place on the fused q and k
    decode_attention(q, cache)          one query token per row (SDPA for prefill)
    silu_mul(gate_up)

For one new token per row (a decode step) the whole layer loop runs in C++ (`DecodeStack` in
cpu_decode_stack.cpp): it is built here from the lean forward's own `LeanLayer`s (the same
tensors, nothing copied) and the layers' kernels (the int8-dot kernels of
llmquant/kernels/registry.py, with their AMX tile layout on CPUs that have AMX, or a float matmul
for float layers), chosen once instead of per call.

The lm_head, when it is a float Linear (it usually is: tied to the embeddings and kept out of
quantization), also gets an INT8 per-row copy for decode steps, as llama.cpp keeps its
output matrix in Q8_0: it is the largest single matrix of a small model (49152 x 576 in the
demo model: 56 MB of bf16 read per token, 28 MB as int8). Only 16-bit heads get it; a float32
model keeps its exact logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmquant.kernels import cpu_ext
from llmquant.kernels.registry import CPU_INT4_DOT_MAX_ROWS, Int4DotCpu, Int8DotCpu, select_kernel
from llmquant.quant.linear import QuantizedLinear
from llmquant.serve.forward.lean import LeanForward
from llmquant.serve.forward.masks import attention_mask, decode_key_mask
from llmquant.serve.kv_cache import GrowingLayer

INT8_HEAD_MAX_ROWS = 8  # the vector kernel's limit
AMX_HEAD_MIN_ROWS = 3  # demo head, one core: tiles 3.4 ms at 1-16 rows; vector 1.8 ms at 1 row, 3.0 at 2, 6.8 at 8
# A batched decode step's rows (and the last positions of a prefilled group); a prompt's logits at
# every position (prompt logprobs, perplexity) keep the model's own head.
AMX_HEAD_MAX_ROWS = 64


def available(model: nn.Module) -> bool:
    """On CPU with the compiled kernels (AVX-512 VNNI), for a bf16 or float32 model that the lean
    forward supports (the kernels have no float16 paths)."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    weight = getattr(embed, "weight", None)
    return (weight is not None and weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float32)
            and LeanForward.supports(model) and cpu_ext.fast() is not None)


class Int8Head:
    """A float lm_head as per-row INT8 for the few-row kernel, rounded as llmquant's W8A16
    scheme rounds a weight (the same observer and grid as `llmquant quantize`). On a CPU with
    AMX it also keeps the bf16-tile layout, which serves any number of rows at about the cost of
    three: a batched decode step's logits."""

    def __init__(self, ext, linear: nn.Linear):
        from llmquant.config.presets import PRESETS
        from llmquant.quant.observers import weight_qparams
        from llmquant.quant.primitives import grouped_view, quantize

        args = PRESETS["W8A16"].weights
        w = linear.weight.detach()
        scale, _ = weight_qparams(w, args, torch.float32)
        self.ext = ext
        self.scale = scale.reshape(-1).contiguous()
        self.weight = quantize(grouped_view(w.float(), args), scale, None, args).reshape(w.shape).contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        n, k = self.weight.shape
        tiles = ext.amx_ready() and n % 16 == 0 and k % 32 == 0 and w.dtype == torch.bfloat16
        self.tiles = ext.int8_amx_pack(self.weight) if tiles else None

    def max_rows(self) -> int:
        """The most rows this head serves (more go to the float head)."""
        return AMX_HEAD_MAX_ROWS if self.tiles is not None else INT8_HEAD_MAX_ROWS

    def __call__(self, x: Tensor) -> Tensor:
        # Float activations: logits are read directly, and rounding the activations to int8
        # moved them measurably (KL 0.004 nats/token against the bf16 head on the probe).
        # float32 in, float32 logits out: no bf16 rounding of logits, and no conversion after.
        # From AMX_HEAD_MIN_ROWS rows the tile kernel (bf16 activations, exact for a bf16 model's
        # hidden states) is faster than the vector one, whose cost grows with every row.
        if self.tiles is not None and x.dtype == torch.bfloat16 and x.numel() // x.shape[-1] >= AMX_HEAD_MIN_ROWS:
            return self.ext.int8_linear_amx(x, self.tiles, self.scale, self.bias)
        return self.ext.int8_linear_float(x.float(), self.weight, self.scale, self.bias)


def one_row_kernel(ext, module: nn.Module, dtype):
    """The C++ one-row kernel of a projection (an `ext.projection`), or None when it has none."""
    if type(module) is nn.Linear:
        return ext.projection(ext.FLOAT, [module.weight, module.bias])
    if not isinstance(module, QuantizedLinear):
        return None
    bias = module.bias.to(dtype) if module.bias is not None else None
    kernel = select_kernel(module, torch.zeros(1, module.in_features, device=module.weight_scale.device, dtype=dtype))
    if isinstance(kernel, Int4DotCpu):
        return ext.projection(ext.INT4, [kernel.packed, kernel.scale, kernel.offset, bias])
    if isinstance(kernel, Int8DotCpu):
        return ext.projection(ext.INT8, [kernel.weight, kernel.scale, kernel.wsum, bias], kernel.mode,
                              kernel.static_scale())
    return None


def decode_stack(ext, lean: LeanForward):
    """The C++ layer loop over `lean`'s layers for decode steps, or None when a projection has
    no one-row kernel or the layers' sliding windows differ (the loop applies one key mask to
    every layer)."""
    if len({layer.window for layer in lean.layers}) > 1:
        return None
    dtype = lean.embed.weight.dtype
    stack = ext.DecodeStack(lean.heads, lean.kv_heads, lean.head_dim, lean.norm_weight, lean.eps)
    for layer in lean.layers:
        kernels = [one_row_kernel(ext, m, dtype) for m in layer.projections()]
        if any(k is None for k in kernels):
            return None
        stack.add_layer(layer.ln1, layer.eps1, kernels[0], kernels[1], layer.ln2, layer.eps2, kernels[2], kernels[3])
    return stack


class CpuSteps:
    """The lean forward's steps on the compiled CPU kernels; decode steps in C++ (`stack`)."""

    name = "CPU kernels"

    def __init__(self, lean: LeanForward):
        self.lean = lean
        self.ext = ext = cpu_ext.fast()
        self.stack = decode_stack(ext, lean)
        # With AMX the stack's 4-bit projections take any number of rows on tiles. Without it they
        # run the vector kernels, ahead of torch's int4pack only up to CPU_INT4_DOT_MAX_ROWS rows
        # (benchmarks/results/kernels_cpu.md): larger batches keep the Python layer loop and the
        # kernels registry.py picks for their size.
        self.stack_rows = 1 << 30 if ext.amx_ready() else CPU_INT4_DOT_MAX_ROWS
        head = lean.lm_head
        # Only over a 16-bit head: its logits already carry bf16/fp16 rounding, and the int8 copy
        # adds error of that order (KL 0.002 nats/token on the demo model's probe). A float32
        # model asked for float32 logits, and keeps them.
        self.int8_head = (Int8Head(ext, head) if type(head) is nn.Linear and head.in_features % 64 == 0
                          and head.weight.dtype in (torch.bfloat16, torch.float16) else None)
        self.rotated_heads = lean.heads + lean.kv_heads
        self.window = lean.layers[0].window

    def decode_step(self, input_ids: Tensor, position_ids: Tensor, mask: Tensor | None, cache) -> Tensor | None:
        """A decode step (one new token per row, any number of rows) through the C++ stack: grow
        the cache buffers, run, expose the new column. None where the stack does not apply (no
        stack, a cache not yet prefilled, or more rows than the stack's kernels serve well)."""
        if self.stack is None or input_ids.shape[0] > self.stack_rows or cache is None or not cache.layers \
                or not all(type(layer) is GrowingLayer and layer.key_buffer is not None for layer in cache.layers):
            return None
        layers, lean = cache.layers, self.lean
        length = layers[0].length
        for layer in layers:
            layer.reserve(length + 1)
        x = lean.embed(input_ids).contiguous()
        key_mask = decode_key_mask(mask, x.shape[0], length + 1, x.device, self.window)
        h = self.stack.step(x, lean.cos[position_ids], lean.sin[position_ids], [layer.key_buffer for layer in layers],
                            [layer.value_buffer for layer in layers], length, key_mask)
        for layer in layers:
            layer.expose(length + 1)
        return self.logits(h)

    def rotary(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.lean.cos[position_ids].contiguous(), self.lean.sin[position_ids].contiguous()  # (B, T, D)

    def mask(self, mask: Tensor | None, batch: int, length: int, past: int, device, window: int | None):
        # One new token per row: a (B, past + 1) key mask for decode_attention; else SDPA's.
        if length == 1:
            return decode_key_mask(mask, batch, past + 1, device, window)
        return attention_mask(mask, batch, length, past, device, window)

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return self.ext.rms_norm(x, weight, eps)

    def add_rms_norm_(self, x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> Tensor:
        return self.ext.add_rms_norm_(x, delta, weight, eps)

    def heads(self, fused: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v from the fused projection (B, T, q + 2 kv), rotary applied in place; k and v
        (B, kv_heads, T, D); q (B, heads, D) for one token (decode_attention's layout), else
        (B, heads, T, D)."""
        lean = self.lean
        batch, length, _ = fused.shape
        q_width, kv_width = lean.split[0], lean.split[1]
        self.ext.rope_(fused, cos, sin, self.rotated_heads, lean.head_dim)
        k = fused[..., q_width:q_width + kv_width].view(batch, length, lean.kv_heads, lean.head_dim).transpose(1, 2)
        v = fused[..., q_width + kv_width:].view(batch, length, lean.kv_heads, lean.head_dim).transpose(1, 2)
        if length == 1:
            q = fused[:, 0, :q_width].view(batch, lean.heads, lean.head_dim)
        else:
            q = fused[..., :q_width].view(batch, length, lean.heads, lean.head_dim).transpose(1, 2)
        return q, k, v

    def attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """(B, T, heads * D)."""
        batch, width = q.shape[0], self.lean.split[0]
        if q.dim() == 3:  # one new token per row
            return self.ext.decode_attention(q, k, v, mask).reshape(batch, 1, width)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=self.lean.heads != self.lean.kv_heads)
        return att.transpose(1, 2).reshape(batch, q.shape[2], width)

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        return self.ext.silu_mul(gate_up)

    def logits(self, h: Tensor) -> Tensor:
        if self.int8_head is not None and h.shape[0] * h.shape[1] <= self.int8_head.max_rows():
            return self.int8_head(h).float()
        return self.lean.lm_head(h).float()
