"""The stack of repeated decoder blocks, found from the module graph (no name is assumed)."""

from __future__ import annotations

from torch import nn

from llmquant.errors import InvalidConfigError


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated decoder blocks: the one holding the most linear layers (float,
    quantized, or being trained by self-distillation: anything with in_features and out_features)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            n = sum(hasattr(m, "in_features") and hasattr(m, "out_features") for m in module.modules())
            if n and (best is None or n > best[0]):
                best = (n, name, module)
    if best is None:
        raise InvalidConfigError("No stack of decoder layers (a ModuleList of blocks) was found in this model; "
                                 "sequential calibration needs one.")
    return best[1], best[2]


def layer_index(name: str, prefix: str) -> int | None:
    """The index of the decoder layer (in the stack named `prefix`) that module `name` belongs to;
    None for a module outside the stack."""
    if not name.startswith(prefix + "."):
        return None
    return int(name[len(prefix) + 1:].split(".", 1)[0])
