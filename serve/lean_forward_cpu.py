"""The lean forward on CPU: each step around the matmuls is one compiled call (cpu_decode_*.cpp).

At batch 1 a 135M-parameter model's decode step on two cores has about 10 ms of arithmetic
and memory traffic, so every PyTorch op that is not a matmul (a few microseconds each, some 40
per layer) matters as much as the kernels. Here a layer is:

    h = add_rms_norm_(x, delta, ln)     residual add + RMSNorm, one pass
    qkv = q/k/v projection              fused (lean_forward.fuse_linears)
    rope_(qkv)                          rotary embedding in place on q and k
    cache.update(k, v); decode_attention(q, cache)    one query token per row
    o_proj, add_rms_norm_, gate/up projection, silu_mul, down projection

For one sequence and one new token (batch-1 decode) the whole layer loop runs in C++
(`DecodeStack` in cpu_decode_stack.cpp) on the layers' one-row kernels (the int8-dot kernels of
kernels.py, or a float matmul for float layers), chosen once here instead of per call; the
loop above is the Python form of the same step, used for several rows.

The lm_head, when it is a float Linear (it usually is: tied to the embeddings and kept out of
quantization), also gets an INT8 per-row copy for one to eight rows, as llama.cpp keeps its
output matrix in Q8_0: it is the largest single matrix of a small model (49152 x 576 in the
demo model: 56 MB of bf16 read per token, 28 MB as int8). Only 16-bit heads get it; a float32
model keeps its exact logits.

Prefill (many rows) keeps the matmul kernels QuantizedLinear picks and SDPA attention. The
engine checks this forward against transformers' on a probe before using it, as it does for
the plain lean forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmquant.kernels import cpu_ext
from llmquant.serve.kv_cache import GrowingLayer
from llmquant.serve.lean_forward import LeanForward, _attention_mask, _decode_key_mask

INT8_HEAD_MAX_ROWS = 8


class _Int8Head:
    """A float lm_head as per-row INT8 for the few-row kernel, rounded as llmquant's W8A16
    scheme rounds a weight (the same observer and grid as `llmquant quantize`)."""

    def __init__(self, ext, linear: nn.Linear):
        from llmquant.quant.observers import weight_qparams
        from llmquant.config.presets import PRESETS
        from llmquant.quant.primitives import grouped_view, quantize

        args = PRESETS["W8A16"].weights
        w = linear.weight.detach()
        scale, _ = weight_qparams(w, args, torch.float32)
        self.ext = ext
        self.scale = scale.reshape(-1).contiguous()
        self.weight = quantize(grouped_view(w.float(), args), scale, None, args).reshape(w.shape).contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def __call__(self, x: Tensor) -> Tensor:
        # Float activations: logits are read directly, and rounding the activations to int8
        # moved them measurably (KL 0.004 nats/token against the bf16 head on the probe).
        # float32 in, float32 logits out: no bf16 rounding of logits, and no conversion after.
        return self.ext.int8_linear_float(x.float(), self.weight, self.scale, self.bias)


def _projection(ext, module: nn.Module, dtype):
    """The C++ one-row kernel of a projection (an `ext.projection`), or None when it has none."""
    from llmquant.kernels.registry import Int4DotCpu, Int8DotCpu, select_kernel
    from llmquant.quant.linear import QuantizedLinear

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


class CpuLeanForward(LeanForward):
    @staticmethod
    def available(model: nn.Module) -> bool:
        """On CPU with the compiled kernels (AVX-512 VNNI), for a bf16 or float32 model that
        LeanForward supports (the kernels have no float16 paths)."""
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        weight = getattr(embed, "weight", None)
        return (weight is not None and weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float32)
                and LeanForward.supports(model) and cpu_ext.fast() is not None)

    def __init__(self, model: nn.Module, max_positions: int):
        super().__init__(model, max_positions)
        self.ext = cpu_ext.fast()
        dtype = self.embed.weight.dtype
        self.eps_per_layer = [(float(layer.input_layernorm.variance_epsilon),
                               float(layer.post_attention_layernorm.variance_epsilon)) for layer in model.model.layers]
        self.stack = self._decode_stack(dtype)
        head = self.lm_head
        # Only over a 16-bit head: its logits already carry bf16/fp16 rounding, and the int8 copy
        # adds error of that order (KL 0.002 nats/token on the demo model's probe). A float32
        # model asked for float32 logits, and keeps them.
        self.int8_head = (_Int8Head(self.ext, head) if type(head) is nn.Linear and head.in_features % 64 == 0
                          and head.weight.dtype in (torch.bfloat16, torch.float16) else None)
        self.rotated_heads = self.heads + self.kv_heads

    def _decode_stack(self, dtype):
        """The C++ layer loop for batch-1 decode, or None when a projection has no one-row kernel
        or the layers' sliding windows differ (the loop applies one key mask to every layer)."""
        if len(set(self.windows)) > 1:
            return None
        ext = self.ext
        stack = ext.DecodeStack(self.heads, self.kv_heads, self.head_dim, self.norm_weight, self.eps)
        for (ln1, *projections), (eps1, eps2) in zip(self.layers, self.eps_per_layer):
            qkv, o_proj, ln2, gate_up, down = projections
            kernels = [_projection(ext, m, dtype) for m in (qkv, o_proj, gate_up, down)]
            if any(k is None for k in kernels):
                return None
            stack.add_layer(ln1, eps1, kernels[0], kernels[1], ln2, eps2, kernels[2], kernels[3])
        return stack

    def _decode_one(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None,
                    layers) -> Tensor:
        """Batch-1 decode through the C++ stack: grow the cache buffers, run, expose the new column."""
        length = layers[0].length
        for layer in layers:
            if layer._k.shape[-2] <= length:
                layer._reserve(length + 1)
        x = self.embed(input_ids).contiguous()
        mask = _decode_key_mask(attention_mask, 1, length + 1, x.device, self.windows[0])
        h = self.stack.step(x, self.cos[position_ids], self.sin[position_ids], [layer._k for layer in layers],
                            [layer._v for layer in layers], length, mask)
        for layer in layers:
            layer._expose(length + 1)
        return self._logits(h)

    def _logits(self, h: Tensor) -> Tensor:
        if self.int8_head is not None and h.shape[0] * h.shape[1] <= INT8_HEAD_MAX_ROWS:
            return self.int8_head(h).float()
        return self.lm_head(h).float()

    def __call__(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None, cache,
                 all_logits: bool) -> Tensor:
        ext = self.ext
        if input_ids.numel() == 1 and self.stack is not None and cache is not None and cache.layers \
                and all(type(layer) is GrowingLayer and layer._k is not None for layer in cache.layers):
            return self._decode_one(input_ids, position_ids, attention_mask, cache.layers)
        batch, length = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        x = self.embed(input_ids).contiguous()  # (B, T, H); the residual stream, updated in place
        cos, sin = self.cos[position_ids].contiguous(), self.sin[position_ids].contiguous()  # (B, T, D)
        decode = length == 1
        # One mask per distinct window: (B, past + 1) key masks to decode, (B, 1, T, past + T) else.
        masks = {w: _decode_key_mask(attention_mask, batch, past + 1, x.device, w) if decode
                 else _attention_mask(attention_mask, batch, length, past, x.device, w) for w in set(self.windows)}
        q_width, kv_width = self.split[0], self.split[1]
        h = ext.rms_norm(x, self.layers[0][0], self.eps_per_layer[0][0])
        for index, (ln1, qkv, o_proj, ln2, gate_up, down) in enumerate(self.layers):
            mask = masks[self.windows[index]]
            causal = mask is None and length > 1 and past == 0
            fused = qkv(h)  # (B, T, q + 2 kv)
            ext.rope_(fused, cos, sin, self.rotated_heads, self.head_dim)
            k = fused[..., q_width:q_width + kv_width].view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            v = fused[..., q_width + kv_width:].view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            k, v = cache.update(k, v, index)
            if decode:
                att = ext.decode_attention(fused[:, 0, :q_width].view(batch, self.heads, self.head_dim), k, v, mask)
            else:
                q = fused[..., :q_width].view(batch, length, self.heads, self.head_dim).transpose(1, 2)
                att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                     enable_gqa=self.heads != self.kv_heads).transpose(1, 2)
            h = ext.add_rms_norm_(x, o_proj(att.reshape(batch, length, q_width)), ln2, self.eps_per_layer[index][1])
            delta = down(ext.silu_mul(gate_up(h)))
            if index + 1 < len(self.layers):
                h = ext.add_rms_norm_(x, delta, self.layers[index + 1][0], self.eps_per_layer[index + 1][0])
            else:
                x.add_(delta)
        if not all_logits:
            x = x[:, -1:].contiguous()
        return self._logits(ext.rms_norm(x, self.norm_weight, self.eps))
