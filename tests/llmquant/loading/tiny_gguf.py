"""Write a Llama checkpoint folder as a GGUF file, the way llama.cpp's converter lays it out.

transformers reads GGUF but cannot write it; the `gguf` package (llama.cpp's own Python library)
can. This writes float32 tensors (no quantization, so a load must reproduce the original logits
exactly) with llama.cpp's tensor names, its Q/K row permutation for rotary embeddings, and the
tokenizer as `tokenizer.ggml.*` metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# Hugging Face Llama parameter name (after "model.layers.N.") -> llama.cpp tensor name in block N.
_BLOCK_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _permute_for_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp interleaves the two rotary halves of each head (convert_hf_to_gguf.py `permute`).
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(folder: Path, out: Path) -> Path:
    import gguf
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])

    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {t["content"] for t in tok["added_tokens"] if t.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)

    tensors = load_file(folder / "model.safetensors")
    for name, tensor in tensors.items():
        array = tensor.to(torch.float32).numpy()
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{_BLOCK_NAMES[rest]}"
            if rest.startswith("self_attn.q_proj"):
                array = _permute_for_rope(array, heads)
            elif rest.startswith("self_attn.k_proj"):
                array = _permute_for_rope(array, kv_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
