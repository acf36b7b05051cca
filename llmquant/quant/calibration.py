"""Run calibration text through the model and feed each quantized layer's inputs to its observer.

Only per-layer statistics are kept (a histogram for static activations, two running sums for
dynamic ones), never the activations themselves, so memory does not grow with the amount of
calibration text.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmquant.quant.args import QuantScheme
from llmquant.quant.observers import ActivationHistogram, DynamicActivationError

ActivationStats = ActivationHistogram | DynamicActivationError


def observe_activations(model: nn.Module, layers: dict[str, QuantScheme], batches: Tensor, *,
                        batch_size: int = 4, progress: bool = True,
                        description: str = "calibrating activations") -> dict[str, ActivationStats]:
    """Observe the inputs of `layers` (name -> scheme with input activations) over `batches` (N, L)."""
    stats: dict[str, ActivationStats] = {}
    hooks = []
    for name, scheme in layers.items():
        args = scheme.input_activations
        stats[name] = DynamicActivationError(args) if args.dynamic else ActivationHistogram(args)
        module = model.get_submodule(name)
        hooks.append(module.register_forward_pre_hook(_hook(stats[name])))
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            chunks = batches.split(batch_size)
            for chunk in tqdm(chunks, desc=description, unit="batch", disable=not progress, leave=False):
                model(input_ids=chunk.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return stats


def _hook(stat: ActivationStats):
    def observe(module: nn.Module, args: tuple) -> None:
        stat.update(args[0])

    return observe
