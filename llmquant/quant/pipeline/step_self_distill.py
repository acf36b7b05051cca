"""The self-distillation step, after rounding: the original model (a copy taken before the first
step) teaches the quantized model (llmquant/distill/self_distill.py); the layers stay
QuantizedLinear with the same scheme, so saving and verification are those of any quantize run.
Held-out perplexity before and after goes to the report (and from there to the model card)."""

from __future__ import annotations

import torch

from llmquant.config.self_distill import SelfDistillConfig
from llmquant.quant.pipeline.context import DataPass, StepContext
from llmquant.quant.primitives import sqnr_db

HELD_OUT_WINDOW = 512  # held-out perplexity before / after, in windows of this many tokens


def self_distill_step(config: SelfDistillConfig, ctx: StepContext) -> None:
    from llmquant.data import calibration_batches
    from llmquant.distill.self_distill import run_self_distill

    teacher = ctx.teacher
    if teacher is None:
        raise RuntimeError("self-distillation needs the copy of the original model taken before quantizing")
    cal = ctx.recipe.calibration
    windows = calibration_batches(ctx.tokenizer, cal.dataset, num_samples=config.samples, seq_len=config.seq_len,
                                  seed=config.seed, text_field=cal.text_field, config_name=cal.config_name)
    ctx.say(config.describe())
    text = dict(dataset=cal.dataset, text_field=cal.text_field, config_name=cal.config_name,
                tokens=config.held_out_tokens)
    before = held_out_perplexity(ctx.net, ctx.tokenizer, **text)
    result = run_self_distill(ctx.net, teacher, windows, config, teacher_name=ctx.loaded.source.describe(),
                              progress=ctx.progress)
    after = held_out_perplexity(ctx.net, ctx.tokenizer, **text)
    original = held_out_perplexity(teacher, ctx.tokenizer, **text)
    _refresh_weight_sqnr(ctx, teacher)
    ctx.teacher = None
    ctx.passes.append(DataPass(step="self_distill", purpose="self-distillation", samples=int(windows.shape[0]),
                               seq_len=int(windows.shape[1]), dataset=cal.dataset, split="calibration",
                               seed=config.seed))
    ctx.self_distill = {**result.to_dict(), "held_out": None}
    if config.held_out_tokens:
        ctx.self_distill["held_out"] = {
            "tokens": config.held_out_tokens, "window": HELD_OUT_WINDOW, "dataset": cal.dataset,
            "perplexity_original": original, "perplexity_before": before, "perplexity_after": after}
        ctx.say(f"self-distillation: held-out perplexity {before:.3f} -> {after:.3f} (original {original:.3f})")


def held_out_perplexity(model, tokenizer, dataset: str, text_field: str = "text", config_name: str | None = None,
                        tokens: int = 8192) -> float | None:
    """Perplexity on the first `tokens` of `dataset`'s held-out split (never trained on), in
    windows of HELD_OUT_WINDOW tokens (or the model's context, when shorter); None when tokens is 0."""
    from llmquant.eval.perplexity import perplexity

    if not tokens:
        return None
    context = getattr(model.config, "max_position_embeddings", None) or HELD_OUT_WINDOW
    return perplexity((model, tokenizer), dataset=dataset, text_field=text_field, config_name=config_name,
                      split="held-out", max_tokens=tokens, window=min(HELD_OUT_WINDOW, context),
                      progress=False).perplexity


def _refresh_weight_sqnr(ctx: StepContext, teacher) -> None:
    """The report's weight SQNR is against the original weights: measured again after training."""
    originals = dict(teacher.named_modules())
    for name, entry in ctx.layer_reports.items():
        original, layer = originals.get(name), ctx.net.get_submodule(name)
        if original is not None and hasattr(original, "weight") and hasattr(layer, "dequantized_weight"):
            with torch.no_grad():
                entry.weight_sqnr_db = sqnr_db(original.weight.detach(), layer.dequantized_weight())
