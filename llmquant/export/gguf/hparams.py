"""Model hyperparameters as llama.cpp reads them: the `{arch}.*` keys of a GGUF file.

llama.cpp has no config.json: every number it needs (layer count, head counts, rope base, norm
epsilon, ...) travels as GGUF metadata. This module reads a transformers `PretrainedConfig` and
writes those keys; the per-family extras (Gemma's soft-capping, Phi-3's rope dimensions) are
written by the architecture classes in `architectures.py`.

transformers 5 keeps rope settings in `config.rope_parameters` — one dict, or one per layer type
({"full_attention": {...}, "sliding_attention": {...}}) for models that mix attention kinds; older
configs kept `rope_theta` / `rope_scaling` at the top level. `rope_settings` reads both.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llmquant.errors import UnsupportedArchitectureError

# rope types whose llama.cpp counterpart we write (see write_rope). Others (dynamic NTK, mrope, ...)
# would load in llama.cpp with plain rope and silently give other logits, so they are refused.
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def rope_settings(config, layer_type: str = "full_attention") -> dict[str, Any]:
    """The rope dict of one layer type, with `rope_type` and `rope_theta` always present."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params.get(layer_type, params)) if isinstance(params, dict) else {}
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    params.setdefault("rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_dimension_count(config) -> int:
    """How many dimensions of each head rope rotates (all, unless `partial_rotary_factor` < 1)."""
    factor = rope_settings(config).get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
    return int(head_dim(config) * factor)


def write_common(writer, config) -> None:
    """The keys every decoder-only family shares, as llama.cpp's TextModel.set_gguf_parameters writes them."""
    if "general.name" not in writer.kv_data[0]:
        # transformers' GGUF loader and llama.cpp's model listing show this; the writer's caller
        # may have set a better one already (then we keep it).
        name = str(getattr(config, "_name_or_path", "") or "").rstrip("/").split("/")[-1]
        writer.add_name(name or config.model_type)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    # llama.cpp derives the head width as hidden / heads unless these say otherwise (Qwen3, Gemma
    # and some Llamas have head_dim * heads != hidden).
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    write_rope(writer, config)


def write_rope(writer, config) -> None:
    """Rope base and scaling (llama3 scaling also needs a tensor: `llama3_rope_factors`)."""
    from gguf import RopeScalingType

    rope = rope_settings(config)
    rope_type = rope["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"GGUF export does not support rope type {rope_type!r} (model type {config.model_type!r}); "
            f"supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}.")
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope_type == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        original = rope.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None)
        if original is None:
            raise UnsupportedArchitectureError(
                "yarn rope scaling without original_max_position_embeddings cannot be described to llama.cpp.")
        writer.add_rope_scaling_orig_ctx_len(int(original))
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))
    # llama3: no key; llama.cpp reads the per-frequency factors from the rope_freqs tensor.


def llama3_rope_factors(config) -> torch.Tensor:
    """Per-frequency divisors of Llama 3.1's rope scaling, as llama.cpp's `rope_freqs.weight`
    (the same formula as transformers' `_compute_llama3_parameters`, expressed as factors)."""
    rope = rope_settings(config)
    dim = rope_dimension_count(config)
    freqs = 1.0 / (float(rope["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = 1.0 / ((1 - smooth) / factor + smooth)
    factors = torch.where(wavelen < old_context / high, torch.ones_like(factors), factors)
    factors = torch.where(wavelen > old_context / low, torch.full_like(factors, factor), factors)
    return factors.to(torch.float32)
