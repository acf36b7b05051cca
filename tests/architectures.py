"""Tiny random-weight models of every architecture in llmquant's support matrix.

Built from transformers' own configuration classes (`AutoConfig.for_model`), so each one has the
real module structure of its family — fused projections, (1 + w) norms, post-norms, q/k norms,
MLA attention, MoE experts held as fused 3-D parameters — at a size a unit test runs in seconds
(2-3 layers, hidden 64). Saved with `save_pretrained`, so the folder has the checkpoint layout
the family's Hub models have (per-expert tensors for Mixtral, Qwen3-MoE, DeepSeek-V3).
"""

from __future__ import annotations

from pathlib import Path

import torch

# hidden 64, head_dim 16: every width is a multiple of 16 and most of 32/64.
_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
_MOE = dict(num_experts_per_tok=2)

ARCHITECTURES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma2": dict(sliding_window=32),
    "gemma3_text": dict(sliding_window=32),
    "phi3": {},
    "olmo2": {},
    "mixtral": dict(_MOE, num_local_experts=4),
    "qwen3_moe": dict(_MOE, num_experts=4, moe_intermediate_size=64, decoder_sparse_step=1),
    "gpt_oss": dict(_MOE, num_local_experts=4, sliding_window=32),
    # MLA expands its latent to every head, as real DeepSeek-V3 checkpoints say (kv heads = heads);
    # fewer kv heads makes transformers' attention regroup heads that are not grouped (batched
    # or padded inputs then fail in transformers' own generate()).
    "deepseek_v3": dict(_MOE, num_key_value_heads=4, num_hidden_layers=3, n_routed_experts=4,
                        moe_intermediate_size=64, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                        q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
                        v_head_dim=32),
    "qwen2_moe": dict(_MOE, num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                      decoder_sparse_step=1),
    "olmoe": dict(_MOE, num_experts=4),
}
MOE_TYPES = ("mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3", "qwen2_moe", "olmoe")


def build_config(model_type: str, tokenizer):
    from transformers import AutoConfig

    kwargs = {**_COMMON, **ARCHITECTURES[model_type]}
    return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                tie_word_embeddings=False, **kwargs)


def make_architecture_dir(model_type: str, path: Path, tokenizer, *, seed: int = 0,
                          dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save a tiny random `model_type` model with `tokenizer` as a safetensors folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_config(model_type, tokenizer)).to(dtype)
    # A random init gives near-uniform outputs; widen the matrices so that quantization error is
    # visible in the logits (the tests assert on it). Routers too, so routing is not uniform.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embed" not in name:
                p.mul_(2.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
