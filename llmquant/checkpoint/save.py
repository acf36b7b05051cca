"""Write a quantized model as a compressed-tensors checkpoint (what vLLM and transformers read).

The quantized layers' buffers already carry the format's tensor names; everything else
(embeddings, norms, lm_head) is written back in the dtype the source checkpoint used.
Tied weights are written once, under the name transformers expects (the embedding). Tensor names
are the checkpoint's, not the in-memory model's where the two differ (Mixtral's experts live under
`block_sparse_moe` on disk and under `mlp` in transformers: `llmquant/arch/registry.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from llmquant.arch.registry import model_spec, to_checkpoint_name
from llmquant.checkpoint.shard_writer import DEFAULT_MAX_SHARD_BYTES, write_weights
from llmquant.quant.linear import QuantizedLinear

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "checkpoint_tensors", "module_tensors", "save_quantized", "tied_keys",
           "write_metadata", "write_weights"]


def tied_keys(model: nn.Module) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied.keys() if isinstance(tied, dict) else tied)


def checkpoint_tensors(model: nn.Module, storage_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors to save, by checkpoint name: quantized buffers as they are, float tensors in
    storage_dtype."""
    return module_tensors(model, "", storage_dtype, model_spec(model), tied_keys(model))


def module_tensors(module: nn.Module, prefix: str, storage_dtype: torch.dtype, spec, skip: set[str],
                   only: set[str] | None = None) -> dict[str, torch.Tensor]:
    """`checkpoint_tensors` of one submodule (`prefix`: its name in the model; "" for the model),
    as a streamed run writes them a decoder layer at a time; `skip`: tied names, left out;
    `only`: just these names (by the model's spelling)."""
    dot = f"{prefix}." if prefix else ""
    quantized_buffers = {
        ".".join(part for part in (prefix, name, b) if part) for name, m in module.named_modules()
        if isinstance(m, QuantizedLinear) for b in m._buffers
    }
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for local, tensor in module.state_dict().items():
        key = dot + local
        if key in skip or (only is not None and key not in only):
            continue
        if key not in quantized_buffers and tensor.is_floating_point():
            tensor = tensor.to(storage_dtype)
        tensor = tensor.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen_storage and tensor.numel() > 0:
            tensor = tensor.clone()  # safetensors refuses shared storage
        seen_storage.add(tensor.untyped_storage().data_ptr())
        out[to_checkpoint_name(key, spec)] = tensor
    return out


def save_quantized(model: nn.Module, tokenizer, folder: Path, quantization_config: dict, *,
                   storage_dtype: torch.dtype, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write weights, config.json (with quantization_config), generation config and tokenizer."""
    folder = Path(folder)
    paths = write_weights(checkpoint_tensors(model, storage_dtype), folder, max_shard_bytes)
    write_metadata(model, tokenizer, folder, quantization_config, storage_dtype=storage_dtype)
    return paths


def write_metadata(model: nn.Module, tokenizer, folder: Path, quantization_config: dict, *,
                   storage_dtype: torch.dtype) -> None:
    """Everything of a checkpoint folder but its weights: config.json with the quantization_config,
    the generation config, the tokenizer."""
    config = model.config.to_diff_dict()  # what save_pretrained writes: the fields that differ from defaults
    config["quantization_config"] = quantization_config
    config["dtype"] = str(storage_dtype).removeprefix("torch.")
    config.pop("_name_or_path", None)
    with open(folder / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
