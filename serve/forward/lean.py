"""The lean forward for Llama-shaped decoders: the same math as transformers, far fewer steps.

At batch 1 on a CPU, a decode step of a small model spends most of its time outside the matmuls:
transformers' forward builds masks, dispatches through attention interfaces, computes rotary
tables per call and runs each projection as its own module call. This forward keeps only the
arithmetic, on the model's own weights (nothing is copied, except where projections are fused):

- q/k/v and gate/up projections that read the same input are fused into one matmul each
  (fuse.py);
- rotary cos/sin come from a table computed once by the model's own rotary module;
- each RMSNorm is fused with the residual add before it, attention is one call with the
  padding/causal mask built once per step (once per distinct sliding window), not per layer;
- keys and values go to the engine's cache (`kv_cache.GrowingLayer`) as with transformers.

The model is described once (`LeanLayer`s: norms, fused projections, sliding window) and run
by one layer loop (`LeanForward.__call__`) over a set of steps: `TorchSteps` (PyTorch ops, any
device) or the compiled CPU kernels (cpu_backend.CpuSteps, which also runs decode steps' layer
loop in C++ over these same layers).

`LeanForward.supports(model)` says whether a model has this shape (Llama, Mistral, Qwen2 and
SmolLM-style models with plain or statically scaled rotary embeddings, full or sliding-window
attention); anything else keeps the transformers forward. The selector (select.py) checks
agreement on a probe input before using it (probe.py), so a model that only looks the part
cannot change results silently. The probe is short, so what only shows on long inputs (the
sliding window, length-dependent rotary tables) is decided by `supports`, not by the probe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmquant.serve.forward.fuse import fuse_linears
from llmquant.serve.forward.interface import Forward
from llmquant.serve.forward.masks import attention_mask

_MODEL_TYPES = {"llama", "mistral", "qwen2"}
_STATIC_ROPE = {None, "default", "linear", "llama3"}  # tables that do not depend on the sequence length
_LAYER_TYPES = {"full_attention", "sliding_attention"}  # the attention patterns the loop reproduces


def _rope_type(config) -> str | None:
    # transformers 5 names it `rope_parameters` (`rope_scaling` is a deprecated alias): read
    # both, so that a missing alias cannot pass a length-dependent table off as "default".
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if any(isinstance(value, dict) for value in scaling.values()):
        return "per layer type"  # one table per attention type (Gemma 3): not one table
    return scaling.get("rope_type", scaling.get("type"))


def layer_windows(config, num_layers: int, max_positions: int) -> list[int | None]:
    """Each layer's sliding window as Llama-family models apply it (Mistral: every layer when
    `sliding_window` is set; Qwen2: the layers `layer_types` marks), None for full attention.
    A window of at least `max_positions` is None too: no query ever sees a key that far back."""
    window = getattr(config, "sliding_window", None)
    if not window or window >= max_positions:
        return [None] * num_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        return [window] * num_layers
    return [window if kind == "sliding_attention" else None for kind in types]


@dataclass
class LeanLayer:
    """One decoder layer as the lean forward (and the C++ decode loop) runs it."""

    ln1: Tensor  # input RMSNorm weight (H,)
    eps1: float
    qkv: nn.Module  # fused q/k/v projection: (.., H) -> (.., q + 2 kv)
    o_proj: nn.Module
    ln2: Tensor  # post-attention RMSNorm weight
    eps2: float
    gate_up: nn.Module  # fused gate/up projection: (.., H) -> (.., 2 I)
    down: nn.Module
    window: int | None  # sliding window in positions, None for full attention

    def projections(self) -> tuple[nn.Module, ...]:
        return self.qkv, self.o_proj, self.gate_up, self.down


class TorchSteps:
    """The lean forward's steps as PyTorch ops (any device, any dtype)."""

    name = "torch"

    def __init__(self, lean: "LeanForward"):
        self.lean = lean

    def decode_step(self, input_ids: Tensor, position_ids: Tensor, mask: Tensor | None, cache) -> Tensor | None:
        """A whole decode step (one token per row) done another way, or None to run the layer loop (always, here)."""
        return None

    def rotary(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        lean = self.lean
        return lean.cos[position_ids].unsqueeze(1), lean.sin[position_ids].unsqueeze(1)  # (B, 1, T, D)

    def mask(self, mask: Tensor | None, batch: int, length: int, past: int, device, window: int | None):
        return attention_mask(mask, batch, length, past, device, window)

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def add_rms_norm_(self, x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> Tensor:
        """x += delta (the residual stream, in place); returns rms_norm(x)."""
        x.add_(delta)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def heads(self, fused: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, heads, T, D) from the fused projection (B, T, q + 2 kv), rotary applied."""
        lean = self.lean
        batch, length, _ = fused.shape
        q, k, v = fused.split(lean.split, dim=-1)
        q = _rope(q.view(batch, length, lean.heads, lean.head_dim).transpose(1, 2), cos, sin)
        k = _rope(k.view(batch, length, lean.kv_heads, lean.head_dim).transpose(1, 2), cos, sin)
        return q, k, v.view(batch, length, lean.kv_heads, lean.head_dim).transpose(1, 2)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """(B, T, heads * D)."""
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=self.lean.heads != self.lean.kv_heads)
        return att.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        g, u = gate_up.chunk(2, dim=-1)
        return F.silu(g) * u

    def logits(self, h: Tensor) -> Tensor:
        return self.lean.lm_head(h).float()


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LeanForward(Forward):
    """`LeanForward(model, max_positions)`: the model described as `LeanLayer`s, run by the
    steps of `steps` (a class taking this forward; `use_steps` swaps them later)."""

    def __init__(self, model: nn.Module, max_positions: int, steps=TorchSteps):
        inner = model.model
        config = model.config
        self.embed = inner.embed_tokens
        self.norm_weight, self.eps = inner.norm.weight, float(inner.norm.variance_epsilon)
        self.lm_head = model.lm_head
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.split = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        windows = layer_windows(config, len(inner.layers), max_positions)
        self.layers = []
        for layer, window in zip(inner.layers, windows):
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(LeanLayer(
                layer.input_layernorm.weight, float(layer.input_layernorm.variance_epsilon),
                fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj]), attn.o_proj,
                layer.post_attention_layernorm.weight, float(layer.post_attention_layernorm.variance_epsilon),
                fuse_linears([mlp.gate_proj, mlp.up_proj]), mlp.down_proj, window))
        dtype = self.embed.weight.dtype
        positions = torch.arange(max_positions, device=self.embed.weight.device)[None]
        with torch.no_grad():
            cos, sin = inner.rotary_emb(self.embed.weight[:1], positions)
        self.cos, self.sin = cos[0].to(dtype), sin[0].to(dtype)  # (positions, head_dim)
        self.use_steps(steps)

    def use_steps(self, steps) -> None:
        """Run this forward's layers with `steps` (TorchSteps, cpu_backend.CpuSteps), built now
        from the current `layers` (so a changed layer takes effect)."""
        self.steps = steps(self)
        self.name = f"lean forward ({self.steps.name})"

    @staticmethod
    def supports(model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        if config is None or inner is None or getattr(config, "model_type", None) not in _MODEL_TYPES:
            return False
        if getattr(config, "hidden_act", "silu") != "silu" or _rope_type(config) not in _STATIC_ROPE:
            return False
        layers = getattr(inner, "layers", None)
        if not layers:
            return False
        types = getattr(config, "layer_types", None)
        if types is not None and (len(types) != len(layers) or not set(types) <= _LAYER_TYPES):
            return False
        attn = layers[0].self_attn
        # Extra per-head norms (Qwen3-style) or attention output gating are not this shape.
        return not any(hasattr(attn, name) for name in ("q_norm", "k_norm")) and hasattr(inner, "rotary_emb")

    def modules(self) -> list[nn.Module]:
        """The projections this forward runs (their kernel layouts are worth keeping)."""
        return [m for layer in self.layers for m in layer.projections()]

    def __call__(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None, cache,
                 all_logits: bool) -> Tensor:
        steps = self.steps
        if input_ids.shape[1] == 1:  # one token per row: its logits are the last position's either way
            logits = steps.decode_step(input_ids, position_ids, attention_mask, cache)
            if logits is not None:
                return logits
        batch, length = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        x = self.embed(input_ids).contiguous()  # (B, T, H): the residual stream, updated in place
        cos, sin = steps.rotary(position_ids)
        masks = {w: steps.mask(attention_mask, batch, length, past, x.device, w)
                 for w in {layer.window for layer in self.layers}}
        layers = self.layers
        h = steps.rms_norm(x, layers[0].ln1, layers[0].eps1)
        for index, layer in enumerate(layers):
            mask = masks[layer.window]
            q, k, v = steps.heads(layer.qkv(h), cos, sin)
            k, v = cache.update(k, v, index)
            att = steps.attention(q, k, v, mask, causal=mask is None and length > 1 and past == 0)
            h = steps.add_rms_norm_(x, layer.o_proj(att), layer.ln2, layer.eps2)
            delta = layer.down(steps.silu_mul(layer.gate_up(h)))
            # The next layer's input norm, or the final norm after the last layer.
            weight, eps = (layers[index + 1].ln1, layers[index + 1].eps1) if index + 1 < len(layers) \
                else (self.norm_weight, self.eps)
            h = steps.add_rms_norm_(x, delta, weight, eps)
        if not all_logits:
            h = h[:, -1:].contiguous()
        return steps.logits(h)
