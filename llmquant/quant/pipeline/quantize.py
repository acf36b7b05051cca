"""`llmquant.quantize(...)`: load, calibrate, quantize, save, verify — the public entry point.

    quantize(model, recipe, load=LoadOptions(...), verification=VerifyOptions(...), run=RunOptions(...))
    quantize(model, scheme="W8A8", num_samples=64, output="out/")   # the same, as keywords

The keywords are the rows of config/flags.py (the `llmquant quantize` flags, same names): each
fills a recipe field or a field of one option object. The recipe's steps (mixed precision,
SmoothQuant, AWQ, GPTQ, then rounding) run through the registry in pipeline/steps.py.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmquant.arch.experts import linearize
from llmquant.arch.registry import model_spec
from llmquant.checkpoint.atomic import check_output_dir
from llmquant.config.flags import LOAD, RECIPE, RUN, VERIFY, build_recipe, options, split_keywords
from llmquant.config.options import LoadOptions, RunOptions, VerifyOptions
from llmquant.config.recipe import Recipe
from llmquant.errors import CorruptCheckpointError, InvalidConfigError
from llmquant.quant.pipeline.context import StepContext
from llmquant.quant.pipeline.coverage import measure_coverage
from llmquant.quant.pipeline.finish import (environment, finalize_report, save_and_verify, source_info,
                                            stream_and_save, verify_in_memory, verify_windows)
from llmquant.quant.pipeline.plan import auto_group_size, plan_layers
from llmquant.quant.pipeline.report import QuantReport
from llmquant.quant.pipeline.sparsity_report import measure_sparsity
from llmquant.quant.pipeline.steps import run_steps
from llmquant.quant.pipeline.targets import linear_layers
from llmquant.quant.pipeline.verify import Agreement, reference_logprobs

if TYPE_CHECKING:
    from llmquant.hub.push import PushResult

__all__ = ["QuantizeResult", "build_recipe", "quantize"]


@dataclass
class QuantizeResult:
    # The quantized model, in memory (QuantizedLinear layers). After a streamed run its weights are
    # back on the meta device (each layer was let go once written): load `output_dir` to run it.
    model: torch.nn.Module
    tokenizer: object
    recipe: Recipe
    report: QuantReport
    output_dir: Path | None
    verification: Agreement | None
    seconds: float
    push: "PushResult | None" = None  # when push_to_hub was given


def quantize(model=None, recipe: Recipe | str | os.PathLike | None = None, *, load: LoadOptions | None = None,
             verification: VerifyOptions | None = None, run: RunOptions | None = None,
             **keywords: Any) -> QuantizeResult:
    """Quantize `model` (a source as for `load_model`, or a `LoadedModel`) and save it to `output`.

    `recipe`: a Recipe, a YAML recipe file, or None for a named `scheme=` (default W4A16: INT4
    weights, group 128 or the largest of 64/32 that fits the model). Keywords (config/flags.py)
    override recipe fields (`group_size=64`, `gptq=True`, `num_samples=64` ...) and option
    fields (`output=`, `overwrite=`, `dtype=`, `verify=` ...) over the objects given.

    Returns the quantized model in memory, the resolved recipe and the per-layer report; when
    `output` is given, the folder is a compressed-tensors checkpoint that vLLM, transformers and
    llmquant load. `push_to_hub` (a Hub repository id) then publishes it with a model card, as
    `llmquant.push(output, push_to_hub, private=private)` does.
    """
    from llmquant.loading import LoadedModel

    t_start = time.perf_counter()
    given = split_keywords(keywords)
    rec = build_recipe(recipe=recipe, **given[RECIPE])
    load, checks, run = (options(LOAD, load, **given[LOAD]), options(VERIFY, verification, **given[VERIFY]),
                         options(RUN, run, **given[RUN]))
    _preflight(rec, run)

    t = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else _load(model, rec, load, checks, run)
    load_seconds = time.perf_counter() - t
    if loaded.weights is not None:
        _check_streamable(run)
        if rec.sparsity is not None:
            raise InvalidConfigError("Pruning runs on a model held in memory, and this model was loaded to be "
                                     "streamed one layer at a time: load it whole.")
        if rec.self_distill is not None:
            raise InvalidConfigError("Self-distillation trains the whole quantized model, and this model was loaded "
                                     "to be streamed one layer at a time: load it whole, or quantize it streamed and "
                                     "run `llmquant distill ORIGINAL --self QUANTIZED` afterwards.")
    if loaded.quantization_config is not None:
        raise InvalidConfigError(f"{loaded.source.describe()} is already quantized; quantize its original model.")
    net, tokenizer = loaded.model, loaded.tokenizer
    spec = model_spec(net)
    ctx = StepContext(net=net, tokenizer=tokenizer, loaded=loaded, recipe=rec, plans=[], run=run)
    ctx.timings["load"] = load_seconds
    # MoE experts held as fused 3-D parameters become one Linear per expert projection, so that
    # every step below covers them (llmquant/arch/experts.py).
    moe_layers = linearize(net, spec.experts)
    if moe_layers:
        ctx.say(f"split the experts of {moe_layers} MoE layers into per-expert Linear layers"
                + (f" ({spec.layout_note})" if spec.layout_note else ""))

    layers = list(linear_layers(net, rec.targets, rec.ignore))
    if not layers:
        raise InvalidConfigError(f"No Linear layer matches targets {list(rec.targets)} minus ignore "
                                 f"{list(rec.ignore)}.")
    if rec.adapt_group_size:
        rec, message = auto_group_size(rec, layers)
        if message:
            ctx.say(message)
    ctx.recipe, ctx.plans = rec, plan_layers(rec, layers)
    # The plans hold the float layers until each is quantized and let go; no other reference may
    # keep them (a streamed run frees each layer's weights after it, an in-memory one its float copy).
    del layers
    ctx.say(f"quantizing {loaded.source.describe()} with {rec.name}: {rec.scheme.describe()}")

    windows = verify_windows(tokenizer, rec.calibration, checks.verify_tokens) if checks.verify else None
    if loaded.weights is not None:
        # Streamed: every step runs inside the one pass over the layers that writes the checkpoint,
        # and the verification streams run beside it (pipeline/streamed.py).
        report, verification_result = stream_and_save(ctx, spec, windows, t_start, lambda: _report(ctx))
    else:
        # The original's predictions, before any step changes the model.
        reference = reference_logprobs(net, windows, run.progress) if windows is not None else None
        if rec.self_distill is not None:
            # The teacher of self-distillation is the original itself, before any step changes it.
            ctx.teacher = copy.deepcopy(net)
        run_steps(rec, ctx)
        report = _report(ctx)
        verification_result = None
        if run.output is not None:
            verification_result = save_and_verify(ctx, report, spec, windows, reference, t_start, load)
        elif reference is not None:
            verification_result = verify_in_memory(ctx, report, windows, reference)
    finalize_report(report, ctx, t_start)
    if run.output is not None:
        for done in ctx.after_save:
            done()
    pushed = None
    if run.push_to_hub is not None:
        from llmquant.hub.push import push

        ctx.say(f"pushing {run.output_path} to {run.push_to_hub}")
        pushed = push(run.output_path, run.push_to_hub, private=run.private)
    return QuantizeResult(model=net, tokenizer=tokenizer, recipe=rec, report=report, output_dir=run.output_path,
                          verification=verification_result, seconds=report.timings_s["total"], push=pushed)


def _report(ctx: StepContext) -> QuantReport:
    """The report of what the steps did, once they are done."""
    rec, loaded = ctx.recipe, ctx.loaded
    report = QuantReport(source=source_info(loaded), recipe=rec.to_dict(), environment=environment(),
                         smoothquant=ctx.smoothing.to_dict() if ctx.smoothing else None, mixed_precision=ctx.mixed,
                         self_distill=ctx.self_distill)
    for plan in ctx.plans:
        if plan.scheme is None:
            report.kept_full_precision[plan.name] = plan.note or "excluded"
        else:
            report.layers.append(ctx.layer_reports[plan.name])
    report.coverage = measure_coverage(ctx.net, {p.name: p.note for p in ctx.plans if p.scheme is None and p.note},
                                       rec.targets, rec.ignore)
    if rec.sparsity is not None:
        report.sparsity = measure_sparsity(ctx.net, report.layers, rec.sparsity, ctx.pruning or {})
    return report


def _load(source, rec: Recipe, load: LoadOptions, checks: VerifyOptions, run: RunOptions):
    """The model in memory, or streamed (run.stream; None: streamed when the plan says the whole
    model would not fit). The plan of both ways is printed first."""
    from llmquant.loading import ModelSource, load_model, resolve_source
    from llmquant.quant.pipeline.memory_plan import plan_peaks

    # Self-distillation trains the model in memory; pruning runs on the model in memory.
    if run.stream is False or rec.self_distill is not None or rec.sparsity is not None:
        return load_model(source, **load.kwargs())
    kwargs = load.kwargs()
    revision = kwargs.pop("revision")
    resolved = source if isinstance(source, ModelSource) else resolve_source(source, revision=revision,
                                                                             allow_pickle=load.allow_pickle)
    try:
        streamed = load_model(resolved, **kwargs, stream=True)
    except (InvalidConfigError, CorruptCheckpointError) as e:
        if run.stream:
            raise
        _say(run, f"loading the whole model: it cannot be read one layer at a time ({e})")
        return load_model(resolved, **kwargs)
    cal = rec.calibration
    peaks = plan_peaks(streamed.model, cal.num_samples, cal.seq_len, gptq=rec.gptq is not None,
                       verify_tokens=checks.verify_tokens if checks.verify else 0, device=streamed.weights.device)
    _say(run, peaks.describe())
    if run.stream is None and peaks.fits_in_memory():
        del streamed
        return load_model(resolved, **kwargs)
    _say(run, "streaming: reading one decoder layer at a time from " + str(resolved.path)
         + ("" if run.stream else " (the whole model would not fit; --no-stream loads it anyway)"))
    return streamed


def _say(run: RunOptions, message: str) -> None:
    if run.progress:
        print(message, file=sys.stderr)


def _check_streamable(run: RunOptions) -> None:
    if run.output is None:
        raise InvalidConfigError("A streamed run writes the quantized model to --output as it goes (it never holds "
                                 "the whole model); give --output, or --no-stream to keep the model in memory.")


def _preflight(rec: Recipe, run: RunOptions) -> None:
    """Everything that can be refused before minutes of work is refused now."""
    if run.output is not None:
        check_output_dir(run.output, run.overwrite)
    if run.push_to_hub is not None:
        from llmquant.hub.push import check_push_target

        check_push_target(run.push_to_hub)  # a bad repo id or a missing token fails now, not after the work
    if rec.sparsity is not None and run.stream:
        raise InvalidConfigError("Pruning runs on a model held in memory; --stream is not available with sparsity "
                                 "yet: drop --stream.")
    if rec.self_distill is not None and run.stream:
        raise InvalidConfigError("Self-distillation trains the whole quantized model against the original, so it "
                                 "needs both in memory: drop --stream, or quantize streamed first and run "
                                 "`llmquant distill ORIGINAL --self QUANTIZED` on a machine that holds them.")
    if run.resume and (run.output is None or rec.gptq is None):
        raise InvalidConfigError("--resume continues an interrupted layer-by-layer (GPTQ) run: it needs --gptq "
                                 "(or a recipe with gptq) and --output.")

