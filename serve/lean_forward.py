"""A lean forward pass for Llama-shaped decoders: the same math as transformers, far fewer steps.

At batch 1 on a CPU, a decode step of a small model spends most of its time outside the matmuls:
transformers' forward builds masks, dispatches through attention interfaces, computes rotary
tables per call and runs each projection as its own module call. This forward keeps only the
arithmetic, on the model's own weights (nothing is copied, except where projections are fused):

- q/k/v and gate/up projections that read the same input are fused into one matmul each (one
  concatenated weight; for quantized layers one QuantizedLinear of the concatenated quantized
  values, so the low-bit kernel runs once instead of two or three times);
- rotary cos/sin come from a table computed once by the model's own rotary module;
- RMSNorm is one fused op (`F.rms_norm`), attention one `scaled_dot_product_attention` call
  with the padding/causal mask built once per step (once per distinct sliding window), not per
  layer;
- keys and values go to the engine's cache (`kv_cache.GrowingLayer`) as with transformers.

`LeanForward.supports(model)` says whether a model has this shape (Llama, Mistral, Qwen2 and
SmolLM-style models with plain or statically scaled rotary embeddings, full or sliding-window
attention); anything else keeps the transformers forward. The engine checks agreement on a probe
input before using it (`check_against`, lean_probe.py), so a model that only looks the part
cannot change results silently. The probe is short, so what only shows on long inputs (the
sliding window, length-dependent rotary tables) is decided by `supports`, not by the probe.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmquant.serve.lean_probe import (NOISE_MARGIN, PROBE_MAX_KL, max_mean_kl, noise_floor, probe_steps,
                               transformers_logprobs)

log = logging.getLogger("llmquant.serve")

_MODEL_TYPES = {"llama", "mistral", "qwen2"}
_STATIC_ROPE = {None, "default", "linear", "llama3"}  # tables that do not depend on the sequence length
_LAYER_TYPES = {"full_attention", "sliding_attention"}  # the attention patterns __call__ reproduces


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


class LeanForward:
    def __init__(self, model: nn.Module, max_positions: int):
        inner = model.model
        config = model.config
        self.embed = inner.embed_tokens
        self.norm_weight, self.eps = inner.norm.weight, float(inner.norm.variance_epsilon)
        self.lm_head = model.lm_head
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight, fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj]), attn.o_proj,
                layer.post_attention_layernorm.weight, fuse_linears([mlp.gate_proj, mlp.up_proj]), mlp.down_proj,
            ))
        self.split = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        self.windows = layer_windows(config, len(self.layers), max_positions)
        dtype = self.embed.weight.dtype
        positions = torch.arange(max_positions, device=self.embed.weight.device)[None]
        with torch.no_grad():
            cos, sin = inner.rotary_emb(self.embed.weight[:1], positions)
        self.cos, self.sin = cos[0].to(dtype), sin[0].to(dtype)  # (positions, head_dim)

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

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def __call__(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None, cache,
                 all_logits: bool) -> Tensor:
        """Logits (B, T or 1, V) in float32; `attention_mask` (B, past + T) marks real tokens,
        None when every row is real; keys/values are appended to `cache` (a transformers Cache)."""
        batch, length = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        x = self.embed(input_ids)
        cos, sin = self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)  # (B, 1, T, D)
        masks = {w: _attention_mask(attention_mask, batch, length, past, x.device, w) for w in set(self.windows)}
        hidden = x.shape[-1]
        for index, (ln1, qkv, o_proj, ln2, gate_up, down) in enumerate(self.layers):
            mask = masks[self.windows[index]]
            causal = mask is None and length > 1 and past == 0
            h = F.rms_norm(x, (hidden,), ln1, self.eps)
            q, k, v = qkv(h).split(self.split, dim=-1)
            q = self._rope(q.view(batch, length, self.heads, self.head_dim).transpose(1, 2), cos, sin)
            k = self._rope(k.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
            v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            k, v = cache.update(k, v, index)
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                 enable_gqa=self.heads != self.kv_heads)
            x = x + o_proj(att.transpose(1, 2).reshape(batch, length, -1))
            g, u = gate_up(F.rms_norm(x, (hidden,), ln2, self.eps)).chunk(2, dim=-1)
            x = x + down(F.silu(g) * u)
        if not all_logits:
            x = x[:, -1:]
        return self.lm_head(F.rms_norm(x, (hidden,), self.norm_weight, self.eps)).float()

    def check_against(self, model: nn.Module, new_cache, cache_kwarg: str, probe_ids: list[int]) -> float:
        """Prefill, then one decode step, on `probe_ids` with this forward and transformers';
        returns the larger of the two steps' mean KL divergence between them."""
        cache, ours = new_cache(), []
        with torch.inference_mode():
            for ids, positions in probe_steps(probe_ids, self.embed.weight.device):
                ours.append(self(ids, positions, None, cache, True).log_softmax(-1))
        return max_mean_kl(transformers_logprobs(model, new_cache, cache_kwarg, probe_ids), ours)


def build_lean_forward(model: nn.Module, max_positions: int, new_cache, cache_kwarg: str,
                       probe_ids: list[int]) -> LeanForward | None:
    """The lean forward for `model` if it has the shape and agrees with transformers on a probe
    (`probe_ids`: PROBE_TEXT tokenized, at least two tokens; lean_probe.py says how closely);
    None (reason logged) otherwise.
    On CPU with the compiled decode kernels the CPU variant (lean_forward_cpu.py) is tried first."""
    from llmquant.serve.lean_forward_cpu import CpuLeanForward

    if not LeanForward.supports(model):
        log.info("lean forward: %s is not a Llama-shaped decoder; using the transformers forward",
                 type(model).__name__)
        return None
    candidates = ([CpuLeanForward] if CpuLeanForward.available(model) else []) + [LeanForward]
    chosen, allowed, floor = None, PROBE_MAX_KL, None
    positions = max(max_positions, len(probe_ids))  # the rotary table must reach the probe's positions too
    for cls in candidates:
        try:
            lean = cls(model, positions)
            error = lean.check_against(model, new_cache, cache_kwarg, probe_ids)
        except Exception:  # a shape it does not handle after all: refused, like a disagreement
            log.warning("%s failed on the probe", cls.__name__, exc_info=True)
            continue
        if error > allowed and floor is None:  # is this model this sensitive to rounding by itself?
            floor = noise_floor(model, new_cache, cache_kwarg, probe_ids)
            allowed = max(PROBE_MAX_KL, NOISE_MARGIN * floor)
            log.info("lean forward probe: KL %.3g; transformers' own noise floor %.3g, bound %.3g",
                     error, floor, allowed)
        if error <= allowed:
            chosen = lean
            break
        log.warning("%s disagrees with transformers on a probe (KL %.3g nats/token, bound %.3g)",
                    cls.__name__, error, allowed)
    # The probe ran transformers' forward: drop the kernel layouts it derived for the unfused
    # projections (the lean forward uses the fused ones), so they do not hold memory.
    keep = [part for layer in chosen.layers for part in layer] if chosen is not None else []
    for module in model.modules():
        kernels = getattr(module, "_kernels", None)
        if isinstance(kernels, dict) and not any(module is part for part in keep):
            kernels.clear()
    if chosen is None:
        log.warning("using the transformers forward")
    else:
        log.info("lean forward: %s", type(chosen).__name__)
    return chosen


def _attention_mask(mask: Tensor | None, batch: int, length: int, past: int, device,
                    window: int | None = None) -> Tensor | None:
    """Boolean (B, 1, T, past + T): key j visible to query t if it is a real token, not in the
    future and, with a sliding `window`, less than `window` columns back (as transformers'
    sliding_window_overlay: the engine's rows are right-aligned, so columns are positions).
    None when plain causal attention (or a single new token with no padding) is exact."""
    total = mask.shape[1] if mask is not None else past + length
    if window is not None and total <= window:
        window = None  # nothing is that far back yet
    if mask is None and window is None and (length == 1 or past == 0):
        return None
    keys = torch.arange(total, device=device)[None, :]
    queries = (total - length + torch.arange(length, device=device))[:, None]
    visible = keys <= queries  # (T, L)
    if window is not None:
        visible = visible & (keys > queries - window)
    if mask is None:
        return visible[None, None].expand(batch, 1, length, total)
    return mask.bool()[:, None, None, :] & visible[None, None]


def _decode_key_mask(mask: Tensor | None, batch: int, total: int, device, window: int | None) -> Tensor | None:
    """(B, total) bool, the keys one new token (the last column) may see: `mask`'s real tokens,
    within `window` of it when there is one. None (all of them) where `mask` is None and the
    window does not reach back that far."""
    if window is None or total <= window:
        return mask
    recent = torch.arange(total, device=device) >= total - window  # (L,) distance total - 1 - j < window
    return recent.expand(batch, total) if mask is None else mask.bool() & recent


class _Fused(nn.Module):
    """Several projections of the same input as one module whose output is their concatenation."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = parts

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def fuse_linears(parts: list[nn.Module]) -> nn.Module:
    """One module computing cat([p(x) for p in parts]) with a single matmul where possible:
    float Linears by concatenating weights, QuantizedLinears of one scheme by concatenating
    their quantized values and per-row scales (exact: rows are independent)."""
    from llmquant.quant.linear import QuantizedLinear

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
    return _Fused(parts)


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
