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


OBSERVE_BATCH = 4  # calibration samples per forward of a statistics pass (a streamed run keeps the same batches)


def new_activation_stats(args) -> ActivationStats:
    """The statistics one layer's input activations need: a histogram for static scales, the
    rounding error of dynamic ones."""
    return DynamicActivationError(args) if args.dynamic else ActivationHistogram(args)


def observe_activations(model: nn.Module, layers: dict[str, QuantScheme], batches: Tensor, *,
                        batch_size: int = OBSERVE_BATCH, progress: bool = True,
                        description: str = "calibrating activations",
                        experts: ExpertCalibration | None = None) -> dict[str, ActivationStats]:
    """Observe the inputs of `layers` (name -> scheme with input activations) over `batches` (N, L).
    With `experts` (the model's MoE experts, counting), experts routed too few tokens are observed
    again on every token in a second pass; their first statistics are discarded."""
    device = next(model.parameters()).device

    def feed(suffix: str) -> None:
        with torch.inference_mode():
            for chunk in tqdm(batches.split(batch_size), desc=description + suffix, unit="batch",
                              disable=not progress, leave=False):
                forward_for_statistics(model, chunk.to(device))

    return _observe_passes(model, "", layers, feed, experts)


def observe_layer(layer: nn.Module, prefix: str, layers: dict[str, QuantScheme], inputs, *,
                  experts: ExpertCalibration | None = None) -> dict[str, ActivationStats]:
    """`observe_activations` for one decoder layer (named `prefix`) run on its captured inputs
    (a sequential.LayerInputs): what a streamed run observes, layer by layer, in the same batches."""
    from llmquant.quant.pipeline.sequential import run_layer

    return _observe_passes(layer, prefix + ".", layers, lambda suffix: run_layer(layer, inputs, keep_outputs=False),
                           experts)


def _observe_passes(root: nn.Module, prefix: str, layers: dict[str, QuantScheme], run, experts
                    ) -> dict[str, ActivationStats]:
    """The routed pass, then (MoE) the pass of the experts routed too few tokens; `run(suffix)`
    feeds the data once, `prefix` is `root`'s name in the model (with its dot)."""
    stats = _observe(root, prefix, layers, lambda: run(""))
    again = {n: layers[n] for n in (experts.fallback() if experts is not None else ()) if n in layers}
    if again:
        stats.update(_observe(root, prefix, again, lambda: run(" (rare experts)")))
    return stats


def _observe(root: nn.Module, prefix: str, layers: dict[str, QuantScheme], run) -> dict[str, ActivationStats]:
    stats: dict[str, ActivationStats] = {}
    hooks = []
    for name, scheme in layers.items():
        stats[name] = new_activation_stats(scheme.input_activations)
        hooks.append(root.get_submodule(name[len(prefix):]).register_forward_pre_hook(_hook(stats[name])))
    try:
        run()
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
