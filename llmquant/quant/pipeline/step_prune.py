"""The pruning step of a quantize run without GPTQ: the targeted layers are pruned in place
(llmquant/prune/sequential_prune.py), then rounding quantizes them like any float layer (a zero
rounds to the code of exactly zero on every grid, so the pruned weights stay zero). With GPTQ,
pruning runs inside GPTQ's pass instead (algorithms/gptq_handler.py)."""

from __future__ import annotations

from llmquant.config.sparsity import SparsityConfig
from llmquant.quant.pipeline.context import StepContext
from llmquant.quant.pipeline.step_gptq import SEQUENTIAL_BATCH


def prune_step(cfg: SparsityConfig, ctx: StepContext) -> None:
    from llmquant.prune.sequential_prune import prune_model

    layers = {p.name: p.module for p in ctx.plans if p.scheme is not None}
    batches = None
    if cfg.needs_data:
        batches = ctx.calibration_batches()
        ctx.record("sparsity", f"{cfg.describe()}: Hessians", batches)
    else:
        ctx.say(f"{cfg.describe()} of {len(layers)} layers")
    ctx.pruning = {name: r.to_dict() for name, r in
                   prune_model(ctx.net, layers, cfg, batches, batch_size=SEQUENTIAL_BATCH, progress=ctx.progress).items()}
