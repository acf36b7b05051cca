"""The rounding step, always the last: observe the input activations of the layers that quantize
them (static scales, or the activation report of dynamic ones), then round every planned layer
that no earlier step quantized to its scheme, and swap in QuantizedLinear layers."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from llmquant.config.recipe import RoundingConfig
from llmquant.quant.algorithms.gptq_handler import scale_dtype_for
from llmquant.quant.linear import QuantizedLinear
from llmquant.quant.pipeline.calibration import observe_activations
from llmquant.quant.pipeline.context import REPORT_PASS_SAMPLES, StepContext
from llmquant.quant.pipeline.expert_calibration import ExpertCalibration
from llmquant.quant.pipeline.plan import LayerPlan
from llmquant.quant.pipeline.report import LayerReport
from llmquant.quant.pipeline.targets import set_submodule
from llmquant.quant.primitives import sqnr_db


def rounding_step(config: RoundingConfig, ctx: StepContext) -> None:
    rest = [p for p in ctx.plans if p.scheme is not None and p.name not in ctx.layer_reports]
    _calibrate(ctx, rest)
    storage_dtype = ctx.loaded.source_dtype
    for plan in tqdm(rest, desc="quantizing layers", unit="layer", disable=not ctx.progress, leave=False):
        entry = quantize_layer(ctx.net, plan, ctx.stats.get(plan.name), storage_dtype)
        if ctx.experts is not None:
            ctx.experts.annotate(entry)
        ctx.layer_reports[plan.name] = entry
        plan.module = None  # the float layer is no longer referenced by the model; let it go


def _calibrate(ctx: StepContext, plans: list[LayerPlan]) -> None:
    """Observe input activations where the scheme quantizes them; weight-only schemes skip this."""
    act_layers = {p.name: p.scheme for p in plans if p.scheme.input_activations}
    if not act_layers:
        return
    cal = ctx.recipe.calibration
    if any(s.has_static_activations for s in act_layers.values()):
        batches = ctx.calibration_batches()
        ctx.record("static_scales", "static activation scales", batches)
    else:
        batches = ctx.calibration_batches(REPORT_PASS_SAMPLES)
        ctx.record("activation_report", "the activation report (dynamic scales need no data)", batches)
    ctx.experts = ExpertCalibration(ctx.net, "", cal.moe_calibration, cal.min_expert_tokens, batches.numel())
    try:
        ctx.stats.update(observe_activations(ctx.net, act_layers, batches, progress=ctx.progress,
                                             experts=ctx.experts))
    finally:
        ctx.experts.finish()


def quantize_layer(net, plan: LayerPlan, stat, pack_scale_dtype: torch.dtype) -> LayerReport:
    scheme = plan.scheme
    scale_dtype = scale_dtype_for(scheme, pack_scale_dtype)
    input_scale = stat.scale() if scheme.has_static_activations else None
    qlayer = QuantizedLinear.from_float(plan.module, scheme, scale_dtype=scale_dtype, input_scale=input_scale)
    entry = LayerReport(name=plan.name, out_features=plan.module.out_features,
                        in_features=plan.module.in_features, scheme=scheme.describe(),
                        weight_sqnr_db=sqnr_db(plan.module.weight.detach(), qlayer.dequantized_weight()),
                        note=plan.note)
    entry.add_activation_stats(stat, scheme.has_static_activations)
    set_submodule(net, plan.name, qlayer)
    return entry
