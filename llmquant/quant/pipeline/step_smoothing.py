"""The smoothing steps: SmoothQuant (activation schemes) and AWQ (weight-only schemes) fold
per-channel scales into the float model before it is rounded (algorithms/smoothquant.py, awq.py)."""

from __future__ import annotations

import torch

from llmquant.config.recipe import AWQConfig, SmoothQuantConfig
from llmquant.quant.pipeline.context import StepContext


def smoothquant_step(config: SmoothQuantConfig, ctx: StepContext) -> None:
    from llmquant.quant.algorithms.smoothquant import smooth_model

    batches = ctx.calibration_batches()
    ctx.record("smoothquant", f"SmoothQuant (alpha {config.alpha}) activation statistics", batches)
    ctx.smoothing = smooth_model(ctx.net, batches, config.alpha, scheme=ctx.recipe.scheme, only=ctx.quantized,
                                 progress=ctx.progress)
    _finish(ctx, "SmoothQuant")


def awq_step(config: AWQConfig, ctx: StepContext) -> None:
    from llmquant.quant.algorithms.awq import awq_model

    batches = ctx.calibration_batches()
    ctx.record("awq", "AWQ scale search", batches)
    ctx.smoothing = awq_model(ctx.net, batches, ctx.recipe.scheme.weights, grid=config.grid, only=ctx.quantized,
                              progress=ctx.progress)
    _finish(ctx, "AWQ")


def _finish(ctx: StepContext, name: str) -> None:
    for layer, why in ctx.smoothing.skipped.items():
        ctx.say(f"  {name} skipped {layer}: {why}")
    round_to_storage(ctx.net, ctx.smoothing.touched - ctx.quantized, ctx.loaded.source_dtype)


def round_to_storage(net, names: set[str], storage_dtype: torch.dtype) -> None:
    """Smoothing rescaled these full-precision modules (norms) in the compute dtype; the
    checkpoint stores them in `storage_dtype`. Round them now so that calibration, the returned
    model and every runtime that loads the checkpoint see the same numbers."""
    with torch.no_grad():
        for name in names:
            for p in net.get_submodule(name).parameters(recurse=False):
                p.copy_(p.to(storage_dtype).to(p.dtype))
