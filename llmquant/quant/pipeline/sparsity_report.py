"""What pruning left in the saved model, measured on the final weights (after rounding): each
layer's fraction of zeros, and the model's, for the report and the model card."""

from __future__ import annotations

from torch import nn

from llmquant.config.sparsity import SparsityConfig
from llmquant.quant.pipeline.report import LayerReport


def measure_sparsity(net: nn.Module, layers: list[LayerReport], cfg: SparsityConfig, pruning: dict) -> dict:
    """Set each layer report's `sparsity` from its weight as it will be saved; `pruning` holds the
    pruning step's own reports (without GPTQ), whose output error and notes are added."""
    zeros = total = 0
    for entry in layers:
        module = net.get_submodule(entry.name)
        w = module.dequantized_weight() if hasattr(module, "dequantized_weight") else module.weight.detach()
        z = int((w == 0).sum())
        entry.sparsity = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
        pruned = pruning.get(entry.name)
        if pruned is not None:
            notes = [entry.note] if entry.note else []
            if pruned.get("output_sqnr_db") is not None:
                notes.append(f"pruning alone: output SQNR {pruned['output_sqnr_db']:.1f} dB")
            if pruned.get("note"):
                notes.append(pruned["note"])
            entry.note = "; ".join(notes) or None
    return {**cfg.to_dict(), "measured": zeros / total if total else 0.0, "layers": len(layers)}

