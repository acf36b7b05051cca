"""`llmquant.quantize(...)`: load, calibrate, quantize, save, verify — the public entry point.

The `llmquant quantize` command is a thin layer of flags over this function, with the same
argument names.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from llmquant.arch.experts import linearize
from llmquant.arch.registry import model_spec
from llmquant.checkpoint.atomic import atomic_directory, check_output_dir
from llmquant.checkpoint.ct_config import build_quantization_config
from llmquant.checkpoint.save import save_quantized
from llmquant.errors import InvalidConfigError
from llmquant.quant.pipeline.calibration import observe_activations
from llmquant.quant.pipeline.coverage import measure_coverage
from llmquant.quant.pipeline.expert_calibration import ExpertCalibration
from llmquant.quant.algorithms.gptq_handler import scale_dtype_for
from llmquant.quant.linear import QuantizedLinear
from llmquant.quant.pipeline.plan import LayerPlan, auto_group_size, config_groups, plan_layers, unquantized_linear_names
from llmquant.quant.primitives import sqnr_db
from llmquant.config.recipe import CalibrationConfig, AWQConfig, GPTQConfig, MixedPrecisionConfig, Recipe, SmoothQuantConfig, recipe_from_scheme
from llmquant.quant.pipeline.report import LayerReport, QuantReport
from llmquant.quant.algorithms.smoothquant import smooth_model
from llmquant.quant.pipeline.targets import linear_layers, set_submodule
from llmquant.quant.pipeline.verify import Agreement, compare_to_reference, reference_logprobs

if TYPE_CHECKING:
    from llmquant.hub.push import PushResult

DEFAULT_SCHEME = "W4A16"
SEQUENTIAL_BATCH = 4  # calibration samples per forward call in layer-by-layer runs
REPORT_PASS_SAMPLES = 8  # dynamic schemes need no calibration; a few samples feed the report
VERIFY_WINDOW = 512


@dataclass
class QuantizeResult:
    model: torch.nn.Module  # the quantized model, in memory (QuantizedLinear layers)
    tokenizer: object
    recipe: Recipe
    report: QuantReport
    output_dir: Path | None
    verification: Agreement | None
    seconds: float
    push: "PushResult | None" = None  # when push_to_hub was given


def build_recipe(*, scheme: str | None = None, recipe: str | os.PathLike | Recipe | None = None,
                 group_size: int | None = None, symmetric: bool | None = None, observer: str | None = None,
                 percentile: float | None = None, activation_observer: str | None = None,
                 activation_percentile: float | None = None, activations: str | None = None,
                 targets: list[str] | None = None, ignore: list[str] | None = None,
                 group_size_fallback: str | None = None, dataset: str | None = None,
                 dataset_config: str | None = None, text_field: str | None = None,
                 num_samples: int | None = None, seq_len: int | None = None, seed: int | None = None,
                 smoothquant: float | str | bool | None = None, gptq: bool | dict | GPTQConfig | None = None,
                 gptq_block_size: int | None = None, gptq_dampening: float | None = None,
                 act_order: bool | None = None, awq: bool | None = None, target_bits: float | None = None,
                 max_ppl_increase: float | None = None, moe_calibration: str | None = None,
                 min_expert_tokens: int | None = None) -> Recipe:
    """A recipe from a file / object or a preset name, with explicit arguments layered on top."""
    if recipe is not None and scheme is not None:
        raise InvalidConfigError("Pass either a recipe or a scheme, not both (a recipe names its scheme).")
    if recipe is None:
        base = recipe_from_scheme(scheme or DEFAULT_SCHEME)
    else:
        base = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    w_over: dict = {}
    if group_size is not None:
        w_over.update(strategy="group", group_size=group_size)
    if symmetric is not None:
        w_over["symmetric"] = symmetric
    if observer is not None:
        w_over["observer"] = observer
    if percentile is not None:
        w_over["percentile"] = percentile
    a_over: dict = {}
    act = base.scheme.input_activations
    if activations is not None:
        if act is None:
            raise InvalidConfigError(f"--activations applies to schemes that quantize activations "
                                     f"(W8A8, FP8, FP8_DYNAMIC), not {base.name}.")
        if activations not in ("static", "dynamic"):
            raise InvalidConfigError(f"activations must be 'static' or 'dynamic', got {activations!r}.")
        a_over.update(dynamic=activations == "dynamic", strategy="token" if activations == "dynamic" else "tensor")
    static = act is not None and not a_over.get("dynamic", act.dynamic)
    # --observer/--percentile cover every calibrated range: weights, and static activations
    # (mse is a weight-only search, so activations keep their own observer then).
    if static and observer in ("minmax", "percentile") and activation_observer is None:
        a_over["observer"] = observer
    if static and percentile is not None and activation_percentile is None:
        a_over["percentile"] = percentile
    if activation_observer is not None:
        a_over["observer"] = activation_observer
    if activation_percentile is not None:
        a_over["percentile"] = activation_percentile
    if a_over and act is None:
        raise InvalidConfigError(f"Activation options apply to W8A8/FP8/FP8_DYNAMIC, not {base.name}.")
    if a_over.get("dynamic"):
        a_over.setdefault("observer", "minmax")
    cal = base.calibration
    cal_over = {k: v for k, v in dict(dataset=dataset, config_name=dataset_config, text_field=text_field,
                                      num_samples=num_samples, seq_len=seq_len, seed=seed,
                                      moe_calibration=moe_calibration,
                                      min_expert_tokens=min_expert_tokens).items() if v is not None}
    calibration = CalibrationConfig.from_dict({**cal.__dict__, **cal_over})
    return base.with_overrides(weights=w_over or None, input_activations=a_over or None,
                               targets=tuple(targets) if targets else None,
                               ignore=tuple(ignore) if ignore is not None else None,
                               group_size_fallback=group_size_fallback, calibration=calibration,
                               smoothquant=_smoothquant_override(smoothquant),
                               gptq=_gptq_override(base.gptq, gptq, gptq_block_size, gptq_dampening, act_order),
                               awq=None if awq is None else (base.awq or AWQConfig()) if awq else False,
                               mixed_precision=_mixed_override(base.mixed_precision, target_bits, max_ppl_increase))


def _mixed_override(current: MixedPrecisionConfig | None, target_bits: float | None,
                    max_ppl_increase: float | None) -> MixedPrecisionConfig | None:
    if target_bits is None and max_ppl_increase is None:
        return None
    keep = {k: v for k, v in dataclasses.asdict(current).items() if k in ("high", "samples")} if current else {}
    return MixedPrecisionConfig(target_bits=target_bits, max_ppl_increase=max_ppl_increase, **keep)


def _gptq_override(current: GPTQConfig | None, gptq: bool | dict | GPTQConfig | None, block_size: int | None,
                   dampening: float | None, act_order: bool | None):
    """None: the recipe's choice; False: off; True or any GPTQ option: on, with those options;
    a GPTQConfig (Python API): on, with its settings; a mapping of some of its fields: on, with
    those fields over the recipe's settings."""
    options = {k: v for k, v in dict(block_size=block_size, dampening=dampening, act_order=act_order).items()
               if v is not None}
    if isinstance(gptq, GPTQConfig):
        return GPTQConfig(**{**dataclasses.asdict(gptq), **options})
    if isinstance(gptq, dict):  # these fields over the recipe's (or the default) settings
        merged = {**dataclasses.asdict(current or GPTQConfig()), **gptq, **options}
        return GPTQConfig.from_dict(merged)
    if gptq is False:
        if options:
            raise InvalidConfigError("GPTQ options were given with GPTQ turned off.")
        return False
    if gptq is None and not options:
        return None
    return GPTQConfig(**{**dataclasses.asdict(current or GPTQConfig()), **options})


def _smoothquant_override(smoothquant: float | str | bool | None):
    """None: the recipe's (or scheme's) choice; False: off; a number or "auto": that alpha."""
    if smoothquant is None or smoothquant is False:
        return smoothquant
    if smoothquant is True:
        return SmoothQuantConfig()
    return SmoothQuantConfig(alpha=smoothquant)


def quantize(model=None, *, output: str | os.PathLike | None = None, scheme: str | None = None,
             recipe: str | os.PathLike | Recipe | None = None, group_size: int | None = None,
             symmetric: bool | None = None, observer: str | None = None, percentile: float | None = None,
             activation_observer: str | None = None, activation_percentile: float | None = None,
             activations: str | None = None, targets: list[str] | None = None, ignore: list[str] | None = None,
             group_size_fallback: str | None = None, dataset: str | None = None,
             dataset_config: str | None = None, text_field: str | None = None, num_samples: int | None = None,
             seq_len: int | None = None, seed: int | None = None,
             smoothquant: float | str | bool | None = None, gptq: bool | dict | GPTQConfig | None = None,
             gptq_block_size: int | None = None, gptq_dampening: float | None = None,
             act_order: bool | None = None, awq: bool | None = None, target_bits: float | None = None,
             max_ppl_increase: float | None = None, moe_calibration: str | None = None,
             min_expert_tokens: int | None = None, resume: bool = False,
             revision: str | None = None,
             dtype: str = "auto", device: str | None = None, allow_pickle: bool = False,
             trust_remote_code: bool = False, overwrite: bool = False, verify: bool = True,
             verify_tokens: int = 2048, push_to_hub: str | None = None, private: bool = False,
             progress: bool = True) -> QuantizeResult:
    """Quantize `model` (a source as for `load_model`, or a `LoadedModel`) and save it to `output`.

    With no scheme and no recipe the scheme is W4A16 (INT4 weights, group 128 or the largest of
    64/32 that fits the model). Returns the quantized model in memory, the resolved recipe and
    the per-layer report; when `output` is given, the folder is a compressed-tensors checkpoint
    that vLLM, transformers and llmquant load. `push_to_hub` (a Hub repository id) then publishes
    it with a model card, as `llmquant.push(output, push_to_hub, private=private)` does.
    """
    from llmquant.loading import LoadedModel, load_model

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    explicit_group = group_size is not None or recipe is not None
    rec = build_recipe(scheme=scheme, recipe=recipe, group_size=group_size, symmetric=symmetric, observer=observer,
                       percentile=percentile, activation_observer=activation_observer,
                       activation_percentile=activation_percentile, activations=activations, targets=targets,
                       ignore=ignore, group_size_fallback=group_size_fallback, dataset=dataset,
                       dataset_config=dataset_config, text_field=text_field, num_samples=num_samples,
                       seq_len=seq_len, seed=seed, smoothquant=smoothquant, gptq=gptq,
                       gptq_block_size=gptq_block_size, gptq_dampening=gptq_dampening, act_order=act_order,
                       awq=awq, target_bits=target_bits, max_ppl_increase=max_ppl_increase,
                       moe_calibration=moe_calibration, min_expert_tokens=min_expert_tokens)
    if output is not None:
        check_output_dir(output, overwrite)  # before minutes of work, not after
    if push_to_hub is not None:
        from llmquant.hub.push import check_push_target

        if output is None:
            raise InvalidConfigError("push_to_hub needs an output folder: the checkpoint is saved, then pushed.")
        check_push_target(push_to_hub)  # a bad repo id or a missing token fails now, not after the work
    if resume and (output is None or rec.gptq is None):
        raise InvalidConfigError("--resume continues an interrupted layer-by-layer (GPTQ) run: it needs --gptq "
                                 "(or a recipe with gptq) and --output.")

    t = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(
        model, revision=revision, dtype=dtype, device=device, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code)
    timings["load"] = time.perf_counter() - t
    if loaded.quantization_config is not None:
        raise InvalidConfigError(f"{loaded.source.describe()} is already quantized; quantize its original model.")
    net, tokenizer = loaded.model, loaded.tokenizer
    spec = model_spec(net)
    # MoE experts held as fused 3-D parameters become one Linear per expert projection, so that
    # every step below covers them (llmquant/arch/experts.py).
    moe_layers = linearize(net, spec.experts)
    if moe_layers:
        _say(progress, f"split the experts of {moe_layers} MoE layers into per-expert Linear layers"
                       + (f" ({spec.layout_note})" if spec.layout_note else ""))

    layers = list(linear_layers(net, rec.targets, rec.ignore))
    if not layers:
        raise InvalidConfigError(f"No Linear layer matches targets {list(rec.targets)} minus ignore "
                                 f"{list(rec.ignore)}.")
    if not explicit_group:
        rec, message = auto_group_size(rec, layers)
        if message and progress:
            print(message, file=sys.stderr)
    plans = plan_layers(rec, layers)
    mixed = _choose_mixed_precision(net, tokenizer, rec, plans, progress) if rec.mixed_precision else None
    _say(progress, f"quantizing {loaded.source.describe()} with {rec.name}: {rec.scheme.describe()}")

    windows = _verify_windows(tokenizer, rec, verify_tokens) if verify else None
    reference = reference_logprobs(net, windows, progress) if windows is not None else None

    t = time.perf_counter()
    batches = _calibration_batches(tokenizer, rec, plans)
    smoothing = None
    if rec.smoothquant is not None:
        _say(progress, f"SmoothQuant (alpha {rec.smoothquant.alpha}) on {batches.shape[0]} x {batches.shape[1]} tokens")
        smoothing = smooth_model(net, batches, rec.smoothquant.alpha, scheme=rec.scheme,
                                 only={p.name for p in plans if p.scheme}, progress=progress)
        for name, why in smoothing.skipped.items():
            _say(progress, f"  SmoothQuant skipped {name}: {why}")
        _round_to_storage(net, smoothing.touched - {p.name for p in plans if p.scheme}, loaded.source_dtype)
    if rec.awq is not None:
        from llmquant.quant.algorithms.awq import awq_model

        _say(progress, f"AWQ scale search on {batches.shape[0]} x {batches.shape[1]} tokens")
        smoothing = awq_model(net, batches, rec.scheme.weights, grid=rec.awq.grid,
                              only={p.name for p in plans if p.scheme}, progress=progress)
        for name, why in smoothing.skipped.items():
            _say(progress, f"  AWQ skipped {name}: {why}")
        _round_to_storage(net, smoothing.touched - {p.name for p in plans if p.scheme}, loaded.source_dtype)
    gptq_reports: dict[str, LayerReport] = {}
    if rec.gptq is not None:
        gptq_reports, gptq_stats, cal_description = _run_gptq(net, rec, plans, batches, loaded, output, resume,
                                                              progress)
        rest = [p for p in plans if p.name not in gptq_reports]
        stats, _, experts = _calibrate(net, rec, rest, batches, progress)
        stats.update(gptq_stats)
    else:
        stats, cal_description, experts = _calibrate(net, rec, plans, batches, progress)
    timings["calibration"] = time.perf_counter() - t

    t = time.perf_counter()
    report = QuantReport(source=_source_info(loaded), recipe=rec.to_dict(), calibration=cal_description,
                         environment=_environment(), smoothquant=smoothing.to_dict() if smoothing else None,
                         mixed_precision=mixed)
    scale_dtype_pack = loaded.source_dtype
    for plan in tqdm(plans, desc="quantizing layers", unit="layer", disable=not progress, leave=False):
        if plan.scheme is None:
            report.kept_full_precision[plan.name] = plan.note or "excluded"
            continue
        if plan.name in gptq_reports:
            report.layers.append(gptq_reports[plan.name])
            continue
        entry = _quantize_layer(net, plan, stats.get(plan.name), scale_dtype_pack)
        if experts is not None:
            experts.annotate(entry)
        report.layers.append(entry)
        plan.module = None  # the float layer is no longer referenced by the model; let it go
    timings["quantize"] = time.perf_counter() - t
    report.coverage = measure_coverage(net, {p.name: p.note for p in plans if p.scheme is None and p.note},
                                       rec.targets, rec.ignore)

    verification = None
    if output is not None:
        qcfg = build_quantization_config(config_groups(rec, plans, spec), unquantized_linear_names(net, plans))
        verification = _save_and_verify(net, tokenizer, rec, report, qcfg, output, overwrite, loaded.source_dtype,
                                        windows, reference, timings, t_start, dtype=dtype, device=device,
                                        progress=progress)
    elif reference is not None:
        verification = compare_to_reference(net, windows, reference, progress)
        report.verification = verification.to_dict()
    timings["total"] = time.perf_counter() - t_start
    report.timings_s = timings
    if output is not None and rec.gptq is not None:
        from llmquant.quant.pipeline.resume import discard, resume_dir

        discard(resume_dir(output))  # the checkpoint is complete: nothing left to resume
    out_path = Path(output).expanduser().absolute() if output is not None else None
    pushed = None
    if push_to_hub is not None:
        from llmquant.hub.push import push

        _say(progress, f"pushing {out_path} to {push_to_hub}")
        pushed = push(out_path, push_to_hub, private=private)
    return QuantizeResult(model=net, tokenizer=tokenizer, recipe=rec, report=report, output_dir=out_path,
                          verification=verification, seconds=timings["total"], push=pushed)


def _save_and_verify(net, tokenizer, rec: Recipe, report: QuantReport, qcfg: dict, output, overwrite: bool,
                     storage_dtype: torch.dtype, windows, reference, timings: dict, t_start: float, *,
                     dtype, device, progress: bool) -> Agreement | None:
    """Write the checkpoint into a temporary folder, verify it from disk, then move it into place."""
    from llmquant.loading import load_model

    verification = None
    with atomic_directory(output, overwrite=overwrite) as tmp:
        t = time.perf_counter()
        save_quantized(net, tokenizer, tmp, qcfg, storage_dtype=storage_dtype)
        (tmp / "recipe.yaml").write_text(rec.to_yaml(), encoding="utf-8")
        timings["save"] = time.perf_counter() - t
        report.checkpoint_bytes = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        if reference is not None:
            t = time.perf_counter()
            # Verify what was written, read back through the same loader users get.
            reloaded = load_model(tmp, dtype=dtype, device=device)
            verification = compare_to_reference(reloaded.model, windows, reference, progress)
            del reloaded
            timings["verify"] = time.perf_counter() - t
            report.verification = verification.to_dict()
        timings["total"] = time.perf_counter() - t_start
        report.timings_s = timings
        report.write(tmp)
    return verification


def _quantize_layer(net, plan: LayerPlan, stat, pack_scale_dtype: torch.dtype) -> LayerReport:
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


def _round_to_storage(net, names: set[str], storage_dtype: torch.dtype) -> None:
    """SmoothQuant rescaled these full-precision modules (norms) in the compute dtype; the
    checkpoint stores them in `storage_dtype`. Round them now so that calibration, the returned
    model and every runtime that loads the checkpoint see the same numbers."""
    with torch.no_grad():
        for name in names:
            for p in net.get_submodule(name).parameters(recurse=False):
                p.copy_(p.to(storage_dtype).to(p.dtype))


def _calibration_batches(tokenizer, rec: Recipe, plans: list[LayerPlan]) -> torch.Tensor | None:
    """Calibration windows when anything needs them: SmoothQuant and static scales use all of
    them, the activation report of dynamic schemes the first few. Weight-only: None."""
    from llmquant.data import calibration_batches

    if rec.gptq is None and rec.awq is None and not any(p.scheme is not None and p.scheme.input_activations for p in plans):
        return None
    cal = rec.calibration
    needs_all = rec.smoothquant is not None or rec.gptq is not None or rec.awq is not None or any(p.scheme is not None and p.scheme.has_static_activations
                                                    for p in plans)
    samples = cal.num_samples if needs_all else min(cal.num_samples, REPORT_PASS_SAMPLES)
    return calibration_batches(tokenizer, cal.dataset, num_samples=samples, seq_len=cal.seq_len, seed=cal.seed,
                               text_field=cal.text_field, config_name=cal.config_name)


def _choose_mixed_precision(net, tokenizer, rec: Recipe, plans: list[LayerPlan], progress: bool) -> dict:
    """Measure each layer's sensitivity and give the sensitive ones the high scheme (mixed.py)."""
    from llmquant.data import calibration_batches
    from llmquant.quant.algorithms.mixed import choose_schemes, layer_sensitivities
    from llmquant.config.presets import preset

    mp, cal = rec.mixed_precision, rec.calibration
    high = preset(mp.high)
    windows = calibration_batches(tokenizer, cal.dataset, num_samples=mp.samples, seq_len=cal.seq_len,
                                  seed=cal.seed, text_field=cal.text_field, config_name=cal.config_name)
    _say(progress, f"measuring the sensitivity of {len(plans)} layers to {rec.scheme.describe()} on "
                   f"{windows.shape[0]} x {windows.shape[1]} calibration tokens")
    sensitivity = layer_sensitivities(net, plans, rec.scheme, windows, progress)
    choice = choose_schemes(plans, sensitivity, rec.scheme, high, target_bits=mp.target_bits,
                            max_ppl_increase=mp.max_ppl_increase)
    for plan in plans:
        if plan.name in choice.schemes:
            plan.scheme = choice.schemes[plan.name]
            if plan.scheme == high:
                plan.note = f"mixed precision: {mp.high} (sensitivity KL {sensitivity[plan.name]:.5f})"
    _say(progress, choice.describe())
    return {"target_bits": mp.target_bits, "max_ppl_increase": mp.max_ppl_increase, "high": mp.high,
            "average_bits": choice.average_bits, "estimated_ppl_increase_pct": choice.estimated_ppl_increase_pct,
            "high_layers": sorted(n for n, s in choice.schemes.items() if s == high),
            "sensitivity": sensitivity}


def _run_gptq(net, rec: Recipe, plans: list[LayerPlan], batches: torch.Tensor, loaded, output, resume: bool,
              progress: bool):
    """GPTQ, decoder layer by decoder layer, on the calibration batches (gptq_model.py), after a
    memory/time plan; with an output folder, a resume point is saved after every layer."""
    from llmquant.quant.pipeline import resume as resume_points
    from llmquant.quant.algorithms.gptq_handler import GPTQHandler
    from llmquant.quant.pipeline.memory_plan import check_plan, plan_sequential
    from llmquant.arch.layers import find_decoder_layers
    from llmquant.quant.pipeline.sequential import capture_first_inputs, run_sequential

    cal, g = rec.calibration, rec.gptq
    description = (f"{batches.shape[0]} x {cal.seq_len} tokens from {cal.dataset} (calibration split, seed "
                   f"{cal.seed}) for GPTQ ({g.describe()})")
    quantized = {p.name for p in plans if p.scheme is not None}
    plan = plan_sequential(net, batches.shape[0], batches.shape[1], SEQUENTIAL_BATCH, quantized)
    _say(progress, plan.describe())
    check_plan(plan)
    _say(progress, f"calibrating on {description}")
    handler = GPTQHandler(net, plans, g, loaded.source_dtype, moe_calibration=cal.moe_calibration,
                          min_expert_tokens=cal.min_expert_tokens, total_tokens=batches.numel())
    _, layers = find_decoder_layers(net)
    device = next(net.parameters()).device
    inputs = capture_first_inputs(net, layers[0], batches, SEQUENTIAL_BATCH, device)
    start, writer = 0, None
    if output is not None:
        folder = resume_points.resume_dir(output)
        key = resume_points.resume_key(rec.to_dict(), loaded.source.describe(), batches)
        state = resume_points.load_resume_point(folder, key) if resume else None
        if state is not None:
            start, reports = resume_points.restore(net, folder, state, {p.name: p for p in plans},
                                                   lambda s: scale_dtype_for(s, loaded.source_dtype), inputs)
            handler.reports.update(reports)
            _say(progress, f"resuming at layer {start} of {len(layers)} from {folder}")
        else:
            if resume:
                _say(progress, f"no resume point in {folder}; starting from the first layer")
            resume_points.discard(folder)
        writer = resume_points.ResumeWriter(folder, key, handler.reports)
    run_sequential(net, batches, handler, batch_size=SEQUENTIAL_BATCH, progress=progress, start_layer=start,
                   inputs=inputs, on_layer_done=writer)
    return handler.reports, handler.stats, {"description": description, "num_samples": batches.shape[0],
                                            "seq_len": cal.seq_len, "dataset": cal.dataset, "seed": cal.seed}


def _calibrate(net, rec: Recipe, plans: list[LayerPlan], batches: torch.Tensor | None, progress: bool):
    """Observe input activations where the scheme quantizes them; weight-only schemes skip this."""
    act_layers = {p.name: p.scheme for p in plans if p.scheme is not None and p.scheme.input_activations}
    if not act_layers:
        return {}, None, None
    cal = rec.calibration
    static = any(s.has_static_activations for s in act_layers.values())
    if not static:
        batches = batches[:REPORT_PASS_SAMPLES]
    purpose = "static activation scales" if static else "the activation report (dynamic scales need no data)"
    samples = batches.shape[0]
    description = (f"{samples} x {cal.seq_len} tokens from {cal.dataset} (calibration split, seed {cal.seed}) "
                   f"for {purpose}")
    _say(progress, f"calibrating on {description}")
    experts = ExpertCalibration(net, "", cal.moe_calibration, cal.min_expert_tokens, batches.numel())
    try:
        stats = observe_activations(net, act_layers, batches, progress=progress, experts=experts)
    finally:
        experts.finish()
    return stats, {"description": description, "num_samples": samples, "seq_len": cal.seq_len,
                   "dataset": cal.dataset, "seed": cal.seed}, experts


def _verify_windows(tokenizer, rec: Recipe, verify_tokens: int) -> torch.Tensor | None:
    from llmquant.data import evaluation_tokens

    cal = rec.calibration
    ids = evaluation_tokens(tokenizer, cal.dataset, max_tokens=verify_tokens, text_field=cal.text_field,
                            config_name=cal.config_name)
    window = min(VERIFY_WINDOW, ids.numel())
    n = ids.numel() // window
    return ids[: n * window].reshape(n, window) if n else None


def _source_info(loaded) -> dict:
    s = loaded.source
    return {"name": s.name, "kind": s.kind, "revision": s.revision, "description": s.describe(),
            "stored_dtype": str(loaded.source_dtype).removeprefix("torch.")}


def _environment() -> dict:
    import platform

    import transformers

    from llmquant import __version__

    from llmquant.runtime import describe_device

    return {"llmquant": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "device": describe_device()}


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr)
