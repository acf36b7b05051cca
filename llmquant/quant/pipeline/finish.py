"""The end of a quantize run: the held-out check of the result, the report's summary of what
data each pass used, and the atomic write of the checkpoint folder."""

from __future__ import annotations

import time

import torch

from llmquant.checkpoint.atomic import atomic_directory
from llmquant.checkpoint.ct_config import build_quantization_config
from llmquant.checkpoint.save import save_quantized, write_metadata
from llmquant.checkpoint.shard_writer import ShardWriter
from llmquant.config.options import LoadOptions
from llmquant.config.recipe import CalibrationConfig, Recipe
from llmquant.quant.pipeline.context import DataPass, StepContext
from llmquant.quant.pipeline.plan import config_groups, unquantized_linear_names
from llmquant.quant.pipeline.report import QuantReport
from llmquant.quant.pipeline.verify import Agreement, compare_to_reference

VERIFY_WINDOW = 512


def verify_windows(tokenizer, cal: CalibrationConfig, verify_tokens: int) -> torch.Tensor | None:
    """Held-out windows of the calibration dataset, (n, VERIFY_WINDOW) token ids (None: too little text)."""
    from llmquant.data import evaluation_tokens

    ids = evaluation_tokens(tokenizer, cal.dataset, max_tokens=verify_tokens, text_field=cal.text_field,
                            config_name=cal.config_name)
    window = min(VERIFY_WINDOW, ids.numel())
    n = ids.numel() // window if window else 0
    return ids[: n * window].reshape(n, window) if n else None


def verification_pass(rec: Recipe, windows: torch.Tensor) -> DataPass:
    return DataPass(step="verification", purpose="verification against the original model",
                    samples=int(windows.shape[0]), seq_len=int(windows.shape[1]), dataset=rec.calibration.dataset,
                    split="held-out")


def verify_in_memory(ctx: StepContext, report: QuantReport, windows, reference) -> Agreement:
    ctx.passes.append(verification_pass(ctx.recipe, windows))
    agreement = compare_to_reference(ctx.net, windows, reference, ctx.progress)
    report.verification = agreement.to_dict()
    return agreement


def save_and_verify(ctx: StepContext, report: QuantReport, spec, windows, reference, t_start: float,
                    load: LoadOptions) -> Agreement | None:
    """Write the checkpoint into a temporary folder, verify it from disk, then move it into place."""
    from llmquant.loading import load_model

    rec, run, timings = ctx.recipe, ctx.run, ctx.timings
    qcfg = build_quantization_config(config_groups(rec, ctx.plans, spec), unquantized_linear_names(ctx.net, ctx.plans))
    verification = None
    with atomic_directory(run.output, overwrite=run.overwrite) as tmp:
        t = time.perf_counter()
        save_quantized(ctx.net, ctx.tokenizer, tmp, qcfg, storage_dtype=ctx.loaded.source_dtype,
                       max_shard_bytes=run.max_shard_bytes)
        (tmp / "recipe.yaml").write_text(rec.to_yaml(), encoding="utf-8")
        timings["save"] = time.perf_counter() - t
        report.checkpoint_bytes = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        if reference is not None:
            t = time.perf_counter()
            # Verify what was written, read back through the same loader users get.
            reloaded = load_model(tmp, dtype=load.dtype, device=load.device)
            ctx.passes.append(verification_pass(rec, windows))
            verification = compare_to_reference(reloaded.model, windows, reference, ctx.progress)
            del reloaded
            timings["verify"] = time.perf_counter() - t
            report.verification = verification.to_dict()
        finalize_report(report, ctx, t_start)
        report.write(tmp)
    return verification


def stream_and_save(ctx: StepContext, spec, windows, t_start: float, build_report) -> tuple[QuantReport, Agreement | None]:
    """A streamed run (pipeline/streamed.py) writing into a temporary folder moved into place at the
    end; verified on the way, against the original layers as they stream by."""
    from llmquant.quant.pipeline import resume as resume_points
    from llmquant.quant.pipeline.streamed import run_streamed

    rec, run = ctx.recipe, ctx.run
    resume = None
    if rec.gptq is not None:
        folder = resume_points.resume_dir(run.output)
        key = resume_points.resume_key(rec.to_dict(), ctx.loaded.source.describe(), ctx.calibration_batches())
        resume = resume_points.StreamResume(folder, key, ctx.layer_reports, run.resume)
        ctx.after_save.append(lambda: resume_points.discard(folder))
    with atomic_directory(run.output, overwrite=run.overwrite) as tmp:
        t = time.perf_counter()
        writer = ShardWriter(tmp, run.max_shard_bytes)
        streamed = run_streamed(ctx, writer, windows, resume)
        writer.close()
        qcfg = build_quantization_config(config_groups(rec, ctx.plans, spec), unquantized_linear_names(ctx.net, ctx.plans))
        write_metadata(ctx.net, ctx.tokenizer, tmp, qcfg, storage_dtype=ctx.loaded.source_dtype)
        (tmp / "recipe.yaml").write_text(rec.to_yaml(), encoding="utf-8")
        ctx.timings["streamed_layers"] = time.perf_counter() - t
        report = build_report()
        report.checkpoint_bytes = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        if streamed.verification is not None:
            ctx.passes.append(verification_pass(rec, windows))
            report.verification = streamed.verification.to_dict()
        finalize_report(report, ctx, t_start)
        report.write(tmp)
    return report, streamed.verification


def finalize_report(report: QuantReport, ctx: StepContext, t_start: float) -> None:
    """The data passes, their summary and the timings, as they stand now."""
    report.data_passes = [p.to_dict() for p in ctx.passes]
    report.calibration = calibration_summary(ctx.passes)
    ctx.timings["total"] = time.perf_counter() - t_start
    report.timings_s = dict(ctx.timings)


def calibration_summary(passes: list[DataPass]) -> dict | None:
    """The calibration text the run read, over every pass that read it: the most samples any pass
    drew, and what each pass used them for (a pass that used fewer says how many)."""
    used = [p for p in passes if p.split == "calibration"]
    if not used:
        return None
    most = max(used, key=lambda p: p.samples)
    purposes = [p.purpose + (f" ({p.samples} x {p.seq_len} tokens)" if (p.samples, p.seq_len) != (most.samples, most.seq_len)
                             else "") for p in used]
    return {"description": f"{most.samples} x {most.seq_len} tokens from {most.dataset} (calibration split, seed "
                           f"{most.seed}) for {'; '.join(purposes)}",
            "num_samples": most.samples, "seq_len": most.seq_len, "dataset": most.dataset, "seed": most.seed}


def source_info(loaded) -> dict:
    s = loaded.source
    return {"name": s.name, "kind": s.kind, "revision": s.revision, "description": s.describe(),
            "stored_dtype": str(loaded.source_dtype).removeprefix("torch.")}


def environment() -> dict:
    import platform

    import transformers

    from llmquant import __version__
    from llmquant.runtime import describe_device

    return {"llmquant": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "device": describe_device()}
