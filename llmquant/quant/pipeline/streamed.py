"""Streamed quantization: the model is read from its files one decoder layer at a time, so a
model larger than memory quantizes with the memory of one layer plus the calibration activations.

The model comes from `load_model(stream=True)`: parameters on the meta device, `weights` reading
them per module (loading/layer_stream.py). Embeddings (and anything else before the stack) are
read first, the first decoder layer's inputs are captured for each stream of hidden states the
recipe needs, and the embeddings are written out and let go. Then for each decoder layer k:
  1. its float tensors are read onto --device;
  2. the verification reference stream (the original model on held-out windows) runs through it;
  3. GPTQ, when the recipe has it, calibrates and quantizes it on the stream of hidden states the
     quantized upstream produces (`sequential.calibrate_layer`, the very function the in-memory
     run calls for each layer);
  4. layers the rounding step quantizes and whose activations need ranges are observed on the
     float stream (the original model's hidden states, which the in-memory run's full forward
     gives them), which then advances through the float layer; then they are rounded
     (`step_rounding.quantize_layer`, as in memory);
  5. the verification stream of the quantized model runs through the quantized layer;
  6. its tensors, in checkpoint format, are appended to the output shards, a resume point is
     saved (GPTQ with --resume), and its memory is released.
The final norm and lm_head are read last, the same way. Each layer's calibration sees the same
inputs, in the same batches, as in the in-memory run, so the checkpoint is the same tensor for
tensor (tests/llmquant/quant/test_streamed.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from torch import Tensor, nn
from tqdm.auto import tqdm

from llmquant.arch.layers import find_decoder_layers, layer_index
from llmquant.arch.mappings import find_mappings
from llmquant.checkpoint.save import module_tensors, tied_keys
from llmquant.checkpoint.shard_writer import ShardWriter
from llmquant.errors import InvalidConfigError
from llmquant.loading.layer_stream import LayerStream, release_module
from llmquant.memory import release_freed_memory
from llmquant.quant.pipeline.calibration import OBSERVE_BATCH, observe_layer
from llmquant.quant.pipeline.context import REPORT_PASS_SAMPLES, StepContext
from llmquant.quant.pipeline.expert_calibration import ExpertCalibration
from llmquant.quant.pipeline.sequential import LayerInputs, calibrate_layer, capture_first_inputs, run_layer
from llmquant.quant.pipeline.step_gptq import SEQUENTIAL_BATCH
from llmquant.quant.pipeline.step_rounding import quantize_layer
from llmquant.quant.pipeline.tail import tail_logits
from llmquant.quant.pipeline.verify import Agreement, compare_logits



@dataclass
class Streams:
    """The hidden states entering the current decoder layer, one set per purpose."""

    quantized: LayerInputs | None = None  # GPTQ: what the quantized upstream produces
    smoothing: LayerInputs | None = None  # SmoothQuant/AWQ statistics: the original model's
    activations: LayerInputs | None = None  # activation ranges: the float model's (smoothed, if it is)
    reference: LayerInputs | None = None  # verification: the original model, held-out windows
    checked: LayerInputs | None = None  # verification: the quantized model, held-out windows
    tuple_outputs: bool = False  # whether decoder layers return (hidden, ...) rather than hidden

    def named(self) -> dict[str, LayerInputs]:
        """The streams this run has, by field name (a resume point saves and restores them)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "tuple_outputs" and getattr(self, f.name) is not None}


@dataclass
class StreamedRun:
    """What quantize() needs back from a streamed run."""

    verification: Agreement | None = None


def run_streamed(ctx: StepContext, writer: ShardWriter, windows: Tensor | None, resume=None) -> StreamedRun:
    """Quantize `ctx.net` (a streamed model) layer by layer into `writer`; see the module docstring.
    `windows`: held-out windows to verify on (None: no verification); `resume`: a StreamResume."""
    net, rec = ctx.net, ctx.recipe
    weights: LayerStream = ctx.loaded.weights
    prefix, layers = find_decoder_layers(net)
    storage, spec, skip = ctx.loaded.source_dtype, weights.spec, tied_keys(net)
    before, after = weights.outside_keys(prefix)
    if rec.mixed_precision is not None:
        _mixed_precision(ctx, weights)
    planned = [p for p in ctx.plans if p.scheme is not None]
    plans_by_layer = _by_layer(planned, [p.name for p in planned], prefix, len(layers))
    outside = [p for p in planned if layer_index(p.name, prefix) is None]
    if any(p.scheme.input_activations for p in outside):
        raise InvalidConfigError("A streamed run quantizes activations only inside the decoder layers; "
                                 f"{outside[0].name} is outside them. Run with --no-stream, or --ignore it.")
    result = StreamedRun()
    smoothing = _smoothing_pass(ctx)
    handler = _gptq_handler(ctx) if rec.gptq is not None else None
    act_batches = _activation_batches(ctx, plans_by_layer) if handler is None else None
    mappings = None
    if smoothing is not None:
        found = find_mappings(net)
        mappings = _by_layer(found, [m.smooth for m in found], prefix, len(layers))

    weights.load("", before)
    streams = _capture(net, layers[0], ctx, handler, act_batches, windows, smoothing is not None)
    writer.add(module_tensors(net, "", storage, spec, skip, only=set(before)))
    weights.release("", before)

    start = 0
    if resume is not None:
        start = resume.restore(streams, writer, handler)
        if start:
            ctx.say(f"resuming at layer {start} of {len(layers)} from {resume.folder}")
    bar = tqdm(total=len(layers), initial=start, desc="quantizing layer by layer (streamed)", unit="layer",
               disable=not ctx.progress)
    try:
        for k in range(start, len(layers)):
            name, layer = f"{prefix}.{k}", layers[k]
            weights.load(name)
            last = k + 1 == len(layers)
            if streams.reference is not None:
                streams.tuple_outputs = run_layer(layer, streams.reference, keep_outputs=True)
            if smoothing is not None:
                _smooth_layer(ctx, layer, mappings[k], streams.smoothing, smoothing)
            if handler is not None:
                calibrate_layer(handler, k, name, layer, streams.quantized, propagate=not last)
            _round_layer(ctx, k, name, layer, plans_by_layer[k], streams, last)
            if streams.checked is not None:
                run_layer(layer, streams.checked, keep_outputs=True)
            tensors = module_tensors(layer, name, storage, spec, skip)
            writer.add(tensors)
            if resume is not None:
                resume.save(k, tensors, streams, handler)
            weights.release(name)
            for plan in plans_by_layer[k]:
                if plan.module is not None:
                    release_module(plan.module)  # a float layer that GPTQ or rounding replaced
            bar.update(1)
    finally:
        bar.close()

    weights.load("", after)
    originals = {p.name: p.module for p in outside}
    for plan in outside:  # targeted layers outside the stack (lm_head): plain rounding, as in memory
        ctx.layer_reports[plan.name] = quantize_layer(net, plan, None, storage)
        plan.module = None
    if streams.reference is not None:
        quantized = {name: net.get_submodule(name) for name in originals}
        result.verification = _verify(net, layers, streams, originals, quantized)
    # Read again: a quantized lm_head's tensors have other names now.
    writer.add(module_tensors(net, "", storage, spec, skip, only=set(weights.outside_keys(prefix)[1])))
    weights.release("", after)
    for name, module in originals.items():
        release_module(net.get_submodule(name))
        release_module(module)
    if handler is not None:
        ctx.layer_reports.update(handler.reports)
        ctx.stats.update(handler.stats)
    if smoothing is not None:
        ctx.smoothing = smoothing
        for module, why in smoothing.skipped.items():
            ctx.say(f"  {'AWQ' if rec.awq is not None else 'SmoothQuant'} skipped {module}: {why}")
    return result


def _mixed_precision(ctx: StepContext, weights: LayerStream) -> None:
    """Mixed precision's plan first (a pass of its own over the layers: streamed_mixed.py)."""
    import functools
    import time

    from llmquant.quant.pipeline.step_mixed import mixed_precision_step
    from llmquant.quant.pipeline.streamed_mixed import streamed_sensitivities

    t = time.perf_counter()
    mixed_precision_step(ctx.recipe.mixed_precision, ctx, measure=functools.partial(streamed_sensitivities, weights))
    ctx.timings["mixed_precision"] = time.perf_counter() - t


def _by_layer(items: list, names: list[str], prefix: str, count: int) -> list[list]:
    """`items` grouped by the decoder layer their name (`names`, in the same order) is in; items
    outside the stack are left out."""
    by_layer: list[list] = [[] for _ in range(count)]
    for item, name in zip(items, names):
        k = layer_index(name, prefix)
        if k is not None:
            by_layer[k].append(item)
    return by_layer


def _gptq_handler(ctx: StepContext):
    from llmquant.quant.algorithms.gptq_handler import GPTQHandler

    g, cal = ctx.recipe.gptq, ctx.recipe.calibration
    batches = ctx.calibration_batches()
    ctx.record("gptq", f"GPTQ Hessians ({g.describe()})", batches)
    return GPTQHandler(ctx.net, ctx.plans, g, ctx.loaded.source_dtype, moe_calibration=cal.moe_calibration,
                       min_expert_tokens=cal.min_expert_tokens, total_tokens=batches.numel())


def _activation_batches(ctx: StepContext, plans_by_layer: list[list]) -> Tensor | None:
    """The rounding step's calibration windows, as its in-memory pass chooses them (None: none needed)."""
    schemes = [p.scheme for plans in plans_by_layer for p in plans if p.scheme.input_activations]
    if not schemes:
        return None
    if any(s.has_static_activations for s in schemes):
        batches = ctx.calibration_batches()
        ctx.record("static_scales", "static activation scales", batches)
    else:
        batches = ctx.calibration_batches(REPORT_PASS_SAMPLES)
        ctx.record("activation_report", "the activation report (dynamic scales need no data)", batches)
    return batches


def _capture(net: nn.Module, first_layer: nn.Module, ctx: StepContext, handler, act_batches: Tensor | None,
             windows: Tensor | None, smoothing: bool) -> Streams:
    device = ctx.loaded.weights.device
    streams = Streams()
    if handler is not None:
        streams.quantized = capture_first_inputs(net, first_layer, ctx.calibration_batches(), SEQUENTIAL_BATCH,
                                                 device)
    if smoothing:
        streams.smoothing = capture_first_inputs(net, first_layer, ctx.calibration_batches(), OBSERVE_BATCH, device)
    if act_batches is not None:
        streams.activations = capture_first_inputs(net, first_layer, act_batches, OBSERVE_BATCH, device)
    if windows is not None:
        # One window per call, as the in-memory verification runs them.
        streams.reference = capture_first_inputs(net, first_layer, windows, 1, device)
        streams.checked = capture_first_inputs(net, first_layer, windows, 1, device)
    return streams


def _round_layer(ctx: StepContext, k: int, name: str, layer: nn.Module, plans: list, streams: Streams,
                 last: bool) -> None:
    """Step 4: observe (float stream), advance the float stream, round what GPTQ did not quantize."""
    rest = [p for p in plans if p.name not in ctx.layer_reports and p.module is not None]
    experts = None
    act_layers = {p.name: p.scheme for p in rest if p.scheme.input_activations}
    if act_layers and streams.activations is not None:
        cal = ctx.recipe.calibration
        total = sum(h.shape[0] * h.shape[1] for h in streams.activations.hidden_states())
        experts = ExpertCalibration(layer, name + ".", cal.moe_calibration, cal.min_expert_tokens, total)
        try:
            ctx.stats.update(observe_layer(layer, name, act_layers, streams.activations, experts=experts))
        finally:
            experts.finish()
    if streams.activations is not None and not last:
        run_layer(layer, streams.activations, keep_outputs=True)
    for plan in rest:
        entry = quantize_layer(ctx.net, plan, ctx.stats.get(plan.name), ctx.loaded.source_dtype)
        if experts is not None:
            experts.annotate(entry)
        ctx.layer_reports[plan.name] = entry
        plan.module = None  # its float weight goes now, not with the rest of the layer
        # The rounding's temporaries (slices of rows, below glibc's mmap threshold) stay in the heap
        # until trimmed: 300-400 MB by the end of a 3B layer, a fifth of the streamed peak.
        release_freed_memory()


def _smoothing_pass(ctx: StepContext):
    """The run-wide SmoothingResult that each layer's smoothing adds to (None: no smoothing)."""
    from llmquant.quant.algorithms.smoothquant import SmoothingResult

    rec = ctx.recipe
    if rec.smoothquant is None and rec.awq is None:
        return None
    batches = ctx.calibration_batches()
    if rec.smoothquant is not None:
        ctx.record("smoothquant", f"SmoothQuant (alpha {rec.smoothquant.alpha}) activation statistics", batches)
        return SmoothingResult(alpha=rec.smoothquant.alpha)
    ctx.record("awq", "AWQ scale search", batches)
    return SmoothingResult(alpha="awq")


def _smooth_layer(ctx: StepContext, layer: nn.Module, mappings: list, inputs: LayerInputs, total) -> None:
    """SmoothQuant or AWQ for one decoder layer: statistics from the original model's hidden states
    (`inputs`, which advance through the layer as it was), then the scales are folded in."""
    from llmquant.quant.algorithms.awq import awq_model
    from llmquant.quant.algorithms.smoothquant import smooth_model
    from llmquant.quant.pipeline.step_smoothing import round_to_storage

    first = LayerInputs(inputs.calls[:1])

    def run(hooks: list, data: LayerInputs, keep: bool) -> None:
        try:
            run_layer(layer, data, keep_outputs=keep)
        finally:
            for h in hooks:
                h.remove()

    rec, batches = ctx.recipe, ctx.calibration_batches()
    streamed = dict(only=ctx.quantized, progress=False, within=mappings, probe=lambda hooks: run(hooks, first, False),
                    feed=lambda hooks: run(hooks, inputs, True))
    if rec.smoothquant is not None:
        done = smooth_model(ctx.net, batches, rec.smoothquant.alpha, scheme=rec.scheme, **streamed)
    else:
        done = awq_model(ctx.net, batches, rec.scheme.weights, grid=rec.awq.grid, **streamed)
    total.applied.update(done.applied)
    total.skipped.update(done.skipped)
    total.touched |= done.touched
    round_to_storage(ctx.net, done.touched - ctx.quantized, ctx.loaded.source_dtype)


def _verify(net: nn.Module, layers: nn.ModuleList, streams: Streams, originals: dict, quantized: dict) -> Agreement:
    """The original's logits (with its float lm_head, if that was quantized) against the quantized
    model's, one window at a time."""
    pairs = tail_logits(net, layers, [streams.reference, streams.checked], streams.tuple_outputs,
                        modules=[originals, quantized])
    return compare_logits((ref[0], checked[0]) for ref, checked in pairs)
