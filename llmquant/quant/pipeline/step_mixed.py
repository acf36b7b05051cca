"""The mixed-precision step: measure each layer's sensitivity, give the most sensitive the high
scheme (algorithms/mixed.py). It changes the layer plans only; the model is left as it was."""

from __future__ import annotations

from llmquant.config.presets import preset
from llmquant.config.recipe import MixedPrecisionConfig
from llmquant.quant.pipeline.context import StepContext


def mixed_precision_step(mp: MixedPrecisionConfig, ctx: StepContext, measure=None) -> None:
    """`measure(model, plans, low, windows, progress)`: the sensitivities (default: in memory,
    `layer_sensitivities`; a streamed run passes its layer-at-a-time measurement)."""
    from llmquant.data import calibration_batches
    from llmquant.quant.algorithms.mixed import choose_schemes, layer_sensitivities

    rec, cal = ctx.recipe, ctx.recipe.calibration
    high = preset(mp.high)
    # Its own few windows: the sensitivity of every layer is one forward per layer and window.
    windows = calibration_batches(ctx.tokenizer, cal.dataset, num_samples=mp.samples, seq_len=cal.seq_len,
                                  seed=cal.seed, text_field=cal.text_field, config_name=cal.config_name)
    ctx.record("mixed_precision", f"mixed precision: sensitivity of {len(ctx.plans)} layers to "
                                  f"{rec.scheme.describe()}", windows)
    sensitivity = (measure or layer_sensitivities)(ctx.net, ctx.plans, rec.scheme, windows, ctx.progress)
    choice = choose_schemes(ctx.plans, sensitivity, rec.scheme, high, target_bits=mp.target_bits,
                            max_ppl_increase=mp.max_ppl_increase)
    for plan in ctx.plans:
        if plan.name in choice.schemes:
            plan.scheme = choice.schemes[plan.name]
            if plan.scheme == high:
                plan.note = f"mixed precision: {mp.high} (sensitivity KL {sensitivity[plan.name]:.5f})"
    ctx.say(choice.describe())
    ctx.mixed = {"target_bits": mp.target_bits, "max_ppl_increase": mp.max_ppl_increase, "high": mp.high,
                 "average_bits": choice.average_bits, "estimated_ppl_increase_pct": choice.estimated_ppl_increase_pct,
                 "high_layers": sorted(n for n, s in choice.schemes.items() if s == high),
                 "sensitivity": sensitivity}
