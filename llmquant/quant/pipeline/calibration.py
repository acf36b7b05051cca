"""Run calibration text through the model and feed each quantized layer's inputs to its observer.

Only per-layer statistics are kept (a histogram for static activations, two running sums for
dynamic ones), never the activations themselves, so memory does not grow with the amount of
calibration text.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmquant.config.args import QuantScheme
from llmquant.quant.pipeline.expert_calibration import ExpertCalibration
from llmquant.quant.observers import ActivationHistogram, DynamicActivationError

ActivationStats = ActivationHistogram | DynamicActivationError


def observe_activations(model: nn.Module, layers: dict[str, QuantScheme], batches: Tensor, *,
                        batch_size: int = 4, progress: bool = True,
                        description: str = "calibrating activations",
                        experts: ExpertCalibration | None = None) -> dict[str, ActivationStats]:
    """Observe the inputs of `layers` (name -> scheme with input activations) over `batches` (N, L).
    With `experts` (the model's MoE experts, counting), experts routed too few tokens are observed
    again on every token in a second pass; their first statistics are discarded."""
    stats = _observe(model, layers, batches, batch_size, progress, description)
    again = {n: layers[n] for n in (experts.fallback() if experts is not None else ()) if n in layers}
    if again:
        stats.update(_observe(model, again, batches, batch_size, progress, description + " (rare experts)"))
    return stats


def observe_layer(layer: nn.Module, prefix: str, layers: dict[str, QuantScheme], inputs, *,
                  experts: ExpertCalibration | None = None) -> dict[str, ActivationStats]:
    """`observe_activations` for one decoder layer (named `prefix`) run on its captured inputs
    (a sequential.LayerInputs): what a streamed run observes, layer by layer, in the same batches."""
    from llmquant.quant.pipeline.sequential import run_layer

    def observe(names: dict[str, QuantScheme]) -> dict[str, ActivationStats]:
        stats: dict[str, ActivationStats] = {}
        hooks = []
        for name, scheme in names.items():
            args = scheme.input_activations
            stats[name] = DynamicActivationError(args) if args.dynamic else ActivationHistogram(args)
            hooks.append(layer.get_submodule(name[len(prefix) + 1:]).register_forward_pre_hook(_hook(stats[name])))
        try:
            run_layer(layer, inputs, keep_outputs=False)
        finally:
            for h in hooks:
                h.remove()
        return stats

    stats = observe(layers)
    again = {n: layers[n] for n in (experts.fallback() if experts is not None else ()) if n in layers}
    if again:
        stats.update(observe(again))
    return stats


def _observe(model: nn.Module, layers: dict[str, QuantScheme], batches: Tensor, batch_size: int, progress: bool,
             description: str) -> dict[str, ActivationStats]:
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
                forward_for_statistics(model, chunk.to(device))
    finally:
        for h in hooks:
            h.remove()
    return stats


def forward_for_statistics(model: nn.Module, ids: Tensor) -> None:
    """A forward pass whose only purpose is to feed hooks. Unless something observes the output
    layer, its logits are computed for the last position only: the vocabulary projection of
    every calibration token was most of an FP8_DYNAMIC run's time (profiled)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    observed = head is None or head._forward_pre_hooks or head._forward_hooks
    kwargs = {} if observed or "logits_to_keep" not in inspect.signature(model.forward).parameters \
        else {"logits_to_keep": 1}
    model(input_ids=ids, use_cache=False, **kwargs)


def _hook(stat: ActivationStats):
    def observe(module: nn.Module, args: tuple) -> None:
        stat.update(args[0])

    return observe
