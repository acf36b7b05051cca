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
from safetensors.torch import save_file
from torch import nn

from llmquant.arch.registry import model_spec, to_checkpoint_name
from llmquant.quant.linear import QuantizedLinear

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _tied_keys(model: nn.Module) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied.keys() if isinstance(tied, dict) else tied)


def checkpoint_tensors(model: nn.Module, storage_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors to save, by checkpoint name: quantized buffers as they are, float tensors in
    storage_dtype."""
    quantized_buffers = {
        f"{name}.{b}" for name, m in model.named_modules() if isinstance(m, QuantizedLinear) for b in m._buffers
    }
    skip = _tied_keys(model)
    spec = model_spec(model)
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for key, tensor in model.state_dict().items():
        if key in skip:
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


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    return shards


def write_weights(tensors: dict[str, torch.Tensor], folder: Path,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        path = folder / WEIGHTS_NAME
        save_file(shards[0], path, metadata={"format": "pt"})
        return [path]
    paths, weight_map = [], {}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        paths.append(folder / name)
        weight_map.update({k: name for k in shard})
    with open(folder / INDEX_NAME, "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return paths


def save_quantized(model: nn.Module, tokenizer, folder: Path, quantization_config: dict, *,
                   storage_dtype: torch.dtype, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write weights, config.json (with quantization_config), generation config and tokenizer."""
    folder = Path(folder)
    paths = write_weights(checkpoint_tensors(model, storage_dtype), folder, max_shard_bytes)
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
    return paths
