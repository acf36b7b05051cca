"""`llmquant distill ORIGINAL --self QUANTIZED`: self-distillation of a quantized folder that
already exists (from `llmquant quantize`, streamed runs included), the original as teacher.

    import llmquant.distill.self_api as sd
    result = sd.self_distill("org/model", "model-W4A16/", output="model-W4A16-sd/", steps=200)

The output is the same compressed-tensors checkpoint (scheme, layout, config) with trained
scales / zero points / norms (and codes, with `rounding`), verified against the original as
`llmquant quantize` verifies, its report and recipe extended with the self-distillation.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from llmquant.checkpoint.atomic import atomic_directory, check_output_dir
from llmquant.config.self_distill import SelfDistillConfig
from llmquant.distill.served_teacher import served_teacher_cache, served_teacher_settings
from llmquant.errors import InvalidConfigError

SETTINGS = tuple(f.name for f in fields(SelfDistillConfig))  # every field of the recipe section


@dataclass
class SelfDistillFolderResult:
    output_dir: Path
    config: SelfDistillConfig
    report: dict                   # the self_distill section written into quantization_report.json
    verification: dict | None
    seconds: float
    timings_s: dict = field(default_factory=dict)
    push: object = None


def self_distill(teacher, quantized: str | os.PathLike, *, output: str | os.PathLike, dataset: str | None = None,
                 text_field: str | None = None, checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
                 overwrite: bool = False, verify_tokens: int = 2048, revision: str | None = None, dtype: str = "auto",
                 device: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
                 progress: bool = True, push_to_hub: str | None = None, private: bool = False, on_step=None,
                 teacher_endpoint: str | None = None, teacher_endpoint_model: str | None = None,
                 **settings) -> SelfDistillFolderResult:
    """Train the quantized folder `quantized` against `teacher` (its original; None: the demo model)
    and save the result to `output`. `settings`: fields of SelfDistillConfig (steps, block_steps, lr,
    rounding_lr, tokens, batch_size, seq_len, train, loss, top_k, seed, held_out_tokens); None keeps
    the default (held_out_tokens=0 skips the held-out perplexity before / after, for a caller that
    measures the saved folder itself).
    `dataset`: the text trained on (default: the calibration dataset of the quantized folder's
    recipe, else the built-in corpus). Resumable checkpoints go to `checkpoint_dir` (default
    `<output>.checkpoints`; Ctrl-C writes one, `resume=True` continues from it). `on_step(step,
    record)` is called after each end-to-end step.
    `teacher_endpoint`: a served original instead of a local one (an OpenAI-compatible server with
    prompt log-probs; `teacher` stays None): its top-k (at most 20) fills the cache once, so the
    original never needs this machine's memory. Only the end-to-end phase runs (the block-wise one
    needs the original's layer outputs), and the saved folder is not verified against the
    original (its full log-probs are not served); held-out perplexity before / after still is."""
    from llmquant.data import calibration_batches
    from llmquant.distill.self_distill import run_self_distill
    from llmquant.loading import load_model
    from llmquant.quant.pipeline.report import held_out_change
    from llmquant.quant.pipeline.step_self_distill import HELD_OUT_WINDOW, held_out_perplexity

    t0, timings = time.perf_counter(), {}
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise InvalidConfigError(f"Unknown self-distillation setting(s) {sorted(unknown)}; valid: {', '.join(SETTINGS)}.")
    if teacher_endpoint is not None:
        if teacher is not None:
            raise InvalidConfigError("Give the original model or a teacher endpoint, not both: with a served teacher "
                                     "the original is not loaded here.")
        settings = served_teacher_settings(settings)
    cfg = SelfDistillConfig.from_dict({k: (tuple(v) if k == "train" else v) for k, v in settings.items()
                                       if v is not None})
    output = check_output_dir(output, overwrite)
    quantized = Path(quantized).expanduser()
    if not (quantized / "config.json").is_file():
        raise InvalidConfigError(f"{quantized} is not a quantized checkpoint folder (no config.json); give the "
                                 "output folder of `llmquant quantize`.")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else output.parent / f"{output.name}.checkpoints"
    if ckpt_dir.exists() and not resume and any(ckpt_dir.iterdir()):
        raise InvalidConfigError(f"{ckpt_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                                 "or remove the folder to start over.")
    load = dict(revision=revision, dtype=dtype, device=device, allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code)
    t = time.perf_counter()
    original = None
    if teacher_endpoint is None:
        original = load_model(teacher, **load)
        if original.quantization_config is not None:
            raise InvalidConfigError(f"{original.source.describe()} is quantized: the teacher is the original model "
                                     "the quantized folder was made from.")
    student = load_model(quantized, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if student.quantization_config is None:
        raise InvalidConfigError(f"{quantized} holds float weights; quantize it first (llmquant quantize), or "
                                 "use llmquant quantize --self-distill.")
    if original is not None:
        _check_same_model(original.model, student.model, quantized)
    timings["load"] = time.perf_counter() - t

    cal = _calibration(quantized, dataset, text_field)
    tokenizer = student.tokenizer
    windows = calibration_batches(tokenizer, cal["dataset"], num_samples=cfg.samples, seq_len=cfg.seq_len,
                                  seed=cfg.seed, text_field=cal["text_field"], config_name=cal["config_name"])
    _say(progress, cfg.describe())
    held_out = cfg.held_out_tokens
    before = held_out_perplexity(student.model, tokenizer, **cal, tokens=held_out)
    teacher_ppl, reference, verify = None, None, None  # a served original: neither is measured here
    if original is not None:
        teacher_ppl = held_out_perplexity(original.model, tokenizer, **cal, tokens=held_out)
        reference, verify = _reference(original.model, tokenizer, cal, verify_tokens, progress)
    if original is None:  # the served original's top-k, fetched once (a local original's comes in training)
        t = time.perf_counter()
        teacher_name = served_teacher_cache(teacher_endpoint, teacher_endpoint_model, tokenizer, windows, ckpt_dir,
                                            cfg, progress)
        timings["teacher_cache"] = time.perf_counter() - t
    else:
        teacher_name = original.source.describe()
    t = time.perf_counter()
    result = run_self_distill(student.model, original.model if original else None, windows, cfg,
                              teacher_name=teacher_name, work_dir=ckpt_dir, checkpoint_dir=ckpt_dir, resume=resume,
                              progress=progress, on_step=on_step)
    timings["train"] = time.perf_counter() - t
    section = {**result.to_dict(), "teacher": teacher_name, "held_out": None}
    if held_out:
        after = held_out_perplexity(student.model, tokenizer, **cal, tokens=held_out)
        section["held_out"] = {"tokens": held_out, "window": HELD_OUT_WINDOW, "dataset": cal["dataset"],
                               "perplexity_original": teacher_ppl, "perplexity_before": before,
                               "perplexity_after": after}
        _say(progress, f"self-distillation: {held_out_change(section['held_out'])}")
    del original

    verification = None
    t = time.perf_counter()
    with atomic_directory(output, overwrite=overwrite) as tmp:
        _save(student, quantized, tmp, cfg)
        if reference is not None:
            from llmquant.quant.pipeline.verify import compare_to_reference

            reloaded = load_model(tmp, dtype=dtype, device=device)
            verification = compare_to_reference(reloaded.model, verify, reference, progress).to_dict()
            del reloaded
        _write_report(quantized, tmp, section, verification)
    timings["save_and_verify"] = time.perf_counter() - t
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the run is complete: its checkpoints are not needed
    out = SelfDistillFolderResult(output_dir=output, config=cfg, report=section, verification=verification,
                                  seconds=time.perf_counter() - t0, timings_s=timings)
    if push_to_hub is not None:
        from llmquant.hub.push import push

        _say(progress, f"pushing {output} to {push_to_hub}")
        out.push = push(output, push_to_hub, private=private)
    return out


def _calibration(quantized: Path, dataset: str | None, text_field: str | None) -> dict:
    """The text to train on: as given, else the quantized folder's calibration dataset."""
    cal = {"dataset": "builtin", "text_field": "text", "config_name": None}
    recipe = quantized / "recipe.yaml"
    if recipe.is_file():
        saved = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("calibration") or {}
        cal.update({k: saved[k] for k in cal if k in saved})
    if dataset is not None:
        cal.update(dataset=dataset, config_name=None)
    if text_field is not None:
        cal["text_field"] = text_field
    return cal


def _check_same_model(original, student, quantized: Path) -> None:
    o, s = original.config, student.config
    for key in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers"):
        if getattr(o, key, None) != getattr(s, key, None):
            raise InvalidConfigError(f"{quantized} was not made from this teacher ({key}: {getattr(s, key, None)} "
                                     f"vs the teacher's {getattr(o, key, None)}); give its original model.")


def _reference(model, tokenizer, cal: dict, verify_tokens: int, progress: bool):
    from llmquant.data import evaluation_tokens
    from llmquant.quant.pipeline.finish import VERIFY_WINDOW
    from llmquant.quant.pipeline.verify import reference_logprobs

    if not verify_tokens:
        return None, None
    ids = evaluation_tokens(tokenizer, cal["dataset"], max_tokens=verify_tokens, text_field=cal["text_field"],
                            config_name=cal["config_name"])
    n = ids.numel() // VERIFY_WINDOW
    if not n:
        return None, None
    windows = ids[: n * VERIFY_WINDOW].reshape(n, VERIFY_WINDOW)
    return reference_logprobs(model, windows, progress), windows


def _save(student, quantized: Path, folder: Path, cfg: SelfDistillConfig) -> None:
    """The trained model in the quantized folder's own format (its quantization_config as is)."""
    from llmquant.checkpoint.save import save_quantized

    qcfg = json.loads((quantized / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    save_quantized(student.model, student.tokenizer, folder, qcfg, storage_dtype=student.source_dtype)
    recipe = quantized / "recipe.yaml"
    data = (yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}) if recipe.is_file() else {}
    data["self_distill"] = cfg.to_dict()
    (folder / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _write_report(quantized: Path, folder: Path, section: dict, verification: dict | None) -> None:
    """quantization_report.json/.md of the quantized folder, with the self-distillation and the
    new verification (the model card reads them)."""
    from llmquant.quant.pipeline.report import REPORT_JSON, REPORT_MD, self_distill_line

    path = quantized / REPORT_JSON
    report = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    report["self_distill"] = section
    # The quantized folder's verification describes the weights before training: replace it, or
    # drop it when this run could not verify (a served teacher, or verify_tokens 0).
    report.pop("verification", None)
    if verification is not None:
        report["verification"] = verification
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2), encoding="utf-8")
    md = (quantized / REPORT_MD).read_text(encoding="utf-8") if (quantized / REPORT_MD).is_file() else ""
    extra = ["", "## Self-distillation (llmquant distill --self)", "", f"- {self_distill_line(section)}"]
    if verification is not None:
        extra.append(f"- verification (reloaded checkpoint vs original): mean KL {verification['kl_mean']:.5f}, "
                     f"top-1 agreement {100 * verification['top1_agreement']:.2f}% on {verification['tokens']} "
                     "held-out tokens")
    else:
        extra.append("- not verified against the original after self-distillation (any verification above is of "
                     "the folder before it)")
    (folder / REPORT_MD).write_text(md.rstrip("\n") + "\n" + "\n".join(extra) + "\n", encoding="utf-8")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr)
