"""`llmquant.distill(...)`: make a student from a teacher, train it to match the teacher, save it.

The `llmquant distill` command is a thin layer of flags over this function, with the same
argument names.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

import torch

from llmquant.checkpoint.atomic import check_output_dir
from llmquant.distill.recipe import DistillRecipe
from llmquant.errors import InvalidConfigError


@dataclass
class DistillResult:
    output_dir: Path
    recipe: DistillRecipe
    student_plan: dict | None
    history: list[dict]          # per optimizer step: loss, ce, kd, hidden, lr
    evals: list[dict]            # held-out perplexity by step
    seconds_per_step: float
    seconds: float
    resumed_from: str | None = None
    quantization: dict | None = None   # QAT export: scheme and verification
    timings_s: dict = field(default_factory=dict)
    push: Any = None                   # llmquant.hub.push.PushResult with push_to_hub

    def to_dict(self) -> dict:
        return {"output_dir": str(self.output_dir), "recipe": self.recipe.to_dict(), "student": self.student_plan,
                "history": self.history, "evals": self.evals, "seconds_per_step": self.seconds_per_step,
                "seconds": self.seconds, "resumed_from": self.resumed_from, "quantization": self.quantization,
                "timings_s": self.timings_s}


def build_distill_recipe(recipe: str | os.PathLike | DistillRecipe | None = None, *,
                         student_layers: int | None = None, keep_layers: list[int] | None = None,
                         intermediate_size: int | None = None, num_key_value_heads: int | None = None,
                         student_config: str | None = None, dataset: str | None = None,
                         text_field: str | None = None, steps: int | None = None, batch_size: int | None = None,
                         grad_accum: int | None = None, seq_len: int | None = None, lr: float | None = None,
                         mixed_precision: str | None = None, optimizer: str | None = None,
                         eval_every: int | None = None, eval_tokens: int | None = None,
                         save_every: int | None = None, seed: int | None = None, divergence: str | None = None,
                         temperature: float | None = None,
                         kd_weight: float | None = None, hidden_weight: float | None = None,
                         teacher_mode: str | None = None, teacher_cache: str | None = None,
                         top_k: int | None = None, teacher_endpoint: str | None = None,
                         qat_scheme: str | None = None, qat_group_size: int | None = None,
                         student_init: str | None = None) -> DistillRecipe:
    """The recipe from a file / object (or the defaults), with explicit arguments on top."""
    rec = recipe if isinstance(recipe, DistillRecipe) else (
        DistillRecipe.load(recipe) if recipe is not None else DistillRecipe())
    student_args = dict(num_layers=student_layers, keep_layers=keep_layers, intermediate_size=intermediate_size,
                        num_key_value_heads=num_key_value_heads, config=student_config, init=student_init)
    if any(v is not None for v in student_args.values()):
        # A student given on the command line replaces the recipe's way of making one.
        rec = DistillRecipe.from_dict({**rec.to_dict(), "student": {k: v for k, v in student_args.items()
                                                                    if v is not None}})
    if teacher_endpoint is not None and teacher_mode is None:
        teacher_mode = "offline"
    if teacher_cache is not None and teacher_mode is None:
        teacher_mode = "offline"
    rec = rec.replace("data", dataset=dataset, text_field=text_field)
    rec = rec.replace("train", steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
                      mixed_precision=mixed_precision, optimizer=optimizer, eval_every=eval_every,
                      eval_tokens=eval_tokens, save_every=save_every, seed=seed)
    rec = rec.replace("loss", divergence=divergence, temperature=temperature, kd_weight=kd_weight,
                      hidden_weight=hidden_weight)
    rec = rec.replace("teacher", mode=teacher_mode, cache=teacher_cache, top_k=top_k, endpoint=teacher_endpoint)
    if qat_scheme is not None or qat_group_size is not None:
        rec = rec.replace("qat", scheme=qat_scheme, group_size=qat_group_size)
    return DistillRecipe.from_dict(rec.to_dict())  # cross-section checks once more


def distill(teacher=None, *, output: str | os.PathLike, recipe: str | os.PathLike | DistillRecipe | None = None,
            student_layers: int | None = None, keep_layers: list[int] | None = None,
            intermediate_size: int | None = None, num_key_value_heads: int | None = None,
            student_config: str | None = None, dataset: str | None = None, text_field: str | None = None,
            steps: int | None = None, batch_size: int | None = None, grad_accum: int | None = None,
            seq_len: int | None = None, lr: float | None = None, mixed_precision: str | None = None,
            optimizer: str | None = None, eval_every: int | None = None, eval_tokens: int | None = None,
            save_every: int | None = None, seed: int | None = None, divergence: str | None = None,
            temperature: float | None = None,
            kd_weight: float | None = None, hidden_weight: float | None = None, teacher_mode: str | None = None,
            teacher_cache: str | None = None, top_k: int | None = None, teacher_endpoint: str | None = None,
            teacher_endpoint_model: str | None = None, qat_scheme: str | None = None,
            qat_group_size: int | None = None, checkpoint_dir: str | os.PathLike | None = None,
            resume: bool = False, overwrite: bool = False, revision: str | None = None, dtype: str = "auto",
            device: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
            progress: bool = True, on_step=None, push_to_hub: str | None = None,
            private: bool = False, student_init: str | os.PathLike | None = None) -> DistillResult:
    """Distill `teacher` (a source as for `load_model`, None for the demo model, or a `LoadedModel`)
    into a smaller student and save it to `output`.

    The student is the teacher with `student_layers` decoder layers kept (the most important on
    training text) or exactly `keep_layers`, optionally narrowed to `intermediate_size` MLP
    neurons and `num_key_value_heads` KV groups; or a fresh model from `student_config`. It is
    trained for `steps` optimizer steps on the training split of `dataset` (the built-in corpus
    by default) with (1 - kd_weight) * CE + kd_weight * divergence; `teacher_mode="offline"`
    reads the teacher's top-k log-probs from `teacher_cache` (built first when missing, from the
    teacher or from `teacher_endpoint`). `qat_scheme` trains quantization-aware and saves a
    compressed-tensors checkpoint. Resumable checkpoints go to `checkpoint_dir` (default
    `<output>.checkpoints`); `resume=True` continues from the latest one. `push_to_hub` then
    publishes the saved folder with `llmquant.push` (relation: distillation).
    """
    from llmquant.loading import LoadedModel, load_model

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    rec = build_distill_recipe(
        recipe, student_layers=student_layers, keep_layers=keep_layers, intermediate_size=intermediate_size,
        num_key_value_heads=num_key_value_heads, student_config=student_config, dataset=dataset,
        text_field=text_field, steps=steps, batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, lr=lr,
        mixed_precision=mixed_precision, optimizer=optimizer, eval_every=eval_every, eval_tokens=eval_tokens,
        save_every=save_every, seed=seed, divergence=divergence, temperature=temperature, kd_weight=kd_weight,
        hidden_weight=hidden_weight, teacher_mode=teacher_mode, teacher_cache=teacher_cache, top_k=top_k,
        teacher_endpoint=teacher_endpoint, qat_scheme=qat_scheme, qat_group_size=qat_group_size,
        student_init=str(student_init) if student_init is not None else None)
    if rec.student.is_empty:
        raise InvalidConfigError("Say how to make the student: --student-layers N (keep the N most important "
                                 "layers), --keep-layers, --intermediate-size / --kv-heads, --student-config FILE, "
                                 "or --student-init FOLDER.")
    output = check_output_dir(output, overwrite)
    if push_to_hub is not None:
        from llmquant.hub.push import check_push_target

        check_push_target(push_to_hub)  # a bad repo id or a missing token fails now, not after training
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else output.parent / f"{output.name}.checkpoints"
    if ckpt_dir.exists() and not resume and any(ckpt_dir.iterdir()):
        raise InvalidConfigError(f"{ckpt_dir} holds checkpoints of an earlier run: pass --resume to continue it, "
                                 "or remove the folder to start over.")
    torch.manual_seed(rec.train.seed)

    t = time.perf_counter()
    loaded = teacher if isinstance(teacher, LoadedModel) else load_model(
        teacher, revision=revision, dtype=dtype, device=device, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code)
    if loaded.quantization_config is not None:
        raise InvalidConfigError(f"{loaded.source.describe()} is quantized; distill from its original model.")
    tokenizer = loaded.tokenizer
    timings["load_teacher"] = time.perf_counter() - t

    from llmquant.distill.data import training_windows

    d = rec.data
    windows = training_windows(tokenizer, d.dataset, seq_len=rec.train.seq_len, text_field=d.text_field,
                               config_name=d.config_name, max_tokens=rec.train.max_train_tokens)
    windows = _windows_read(windows, rec)
    t = time.perf_counter()
    student, plan = _make_student(loaded, rec, windows, progress)
    timings["make_student"] = time.perf_counter() - t

    cache = None
    uses_teacher = rec.loss.kd_weight > 0 or rec.loss.hidden_weight > 0
    if uses_teacher and rec.teacher.mode == "offline":
        t = time.perf_counter()
        cache = _teacher_cache(loaded, rec, windows, output, teacher_endpoint_model, progress)
        timings["teacher_cache"] = time.perf_counter() - t

    qat_plan = None
    if rec.qat is not None:
        from llmquant.distill.fake_quant import apply_fake_quant

        qat_plan = _resolve_qat(student, rec)
        apply_fake_quant(student, qat_plan["scheme"], scale_dtype=loaded.source_dtype)
        _say(progress, f"quantization-aware training: {qat_plan['scheme'].describe()}")

    masks = None
    if rec.student.init is not None:
        from llmquant.prune.masks import zero_masks

        masks = zero_masks(student)
        if masks:
            zeros = sum(int((~m).sum()) for _, m in masks) / sum(m.numel() for _, m in masks)
            _say(progress, f"pruned student: {len(masks)} weight matrices, {zeros:.1%} zeros held at zero in training")
    teacher_model = loaded.model if (uses_teacher and cache is None) else None
    if teacher_model is None and not isinstance(teacher, LoadedModel):
        loaded.model = None  # offline or CE-only: the teacher leaves memory before training

    from llmquant.distill.trainer import Trainer

    evaluate = _held_out_perplexity(tokenizer, rec) if rec.train.eval_every else None
    trainer = Trainer(student, rec, windows=windows, teacher=teacher_model, cache=cache,
                      kept_layers=plan.kept_layers if plan else None, checkpoint_dir=ckpt_dir, evaluate=evaluate,
                      progress=progress, on_step=on_step, masks=masks)
    _say(progress, f"training {rec.train.steps} steps of {rec.train.batch_size} x {rec.train.seq_len} tokens"
         f" x {rec.train.grad_accum} accumulation ({'CE only' if not uses_teacher else rec.loss.divergence}, "
         f"teacher {'offline cache' if cache else 'online' if uses_teacher else 'unused'})")
    trained = trainer.train(resume=resume)
    timings["train"] = trained.seconds
    student = trainer.unwrapped_student()
    del trainer, teacher_model

    result = DistillResult(output_dir=output, recipe=rec, student_plan=plan.to_dict() if plan else None,
                           history=trained.history, evals=trained.evals,
                           seconds_per_step=trained.seconds_per_step, seconds=0.0,
                           resumed_from=trained.resumed_from, timings_s=timings)
    files = {"distill_recipe.yaml": rec.to_yaml()}
    t = time.perf_counter()
    if rec.qat is not None:
        from llmquant.distill.export import export_quantized

        q = export_quantized(student, tokenizer, output, qat=_qat_with_group(rec, qat_plan),
                             storage_dtype=loaded.source_dtype, overwrite=overwrite, progress=progress,
                             files=files)
        result.quantization = {"scheme": q.recipe.scheme.describe(),
                               "verification": q.verification.to_dict() if q.verification else None}
        # The checkpoint is complete and in place; the report (with the export's verification) joins it.
        (output / "distill_report.json").write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
    else:
        from llmquant.distill.export import save_student

        files["distill_report.json"] = json.dumps(result.to_dict(), indent=1)
        save_student(student, tokenizer, output, storage_dtype=loaded.source_dtype, overwrite=overwrite,
                     files=files)
    timings["save"] = time.perf_counter() - t
    result.seconds = time.perf_counter() - t0
    if push_to_hub is not None:
        from llmquant.hub.card_facts import DEMO_BASE_MODEL
        from llmquant.hub.push import push

        _say(progress, f"pushing {output} to {push_to_hub}")
        result.push = push(output, push_to_hub, private=private, relation="distillation",
                           base_model=_hub_base_model(teacher) if teacher is not None else DEMO_BASE_MODEL)
    return result


def _hub_base_model(teacher) -> str | None:
    """The teacher's Hub id when it was given as one (not a local folder, file or loaded model)."""
    if not isinstance(teacher, str) or Path(teacher).expanduser().exists() or teacher.count("/") != 1:
        return None
    return teacher.split("@", 1)[0]


def _windows_read(windows: torch.Tensor, rec: DistillRecipe) -> torch.Tensor:
    """Only the windows training will read (a seeded random subset when the run is shorter than an
    epoch), so that an offline teacher cache holds nothing that is never used."""
    from llmquant.distill.data import epoch_order

    t = rec.train
    needed = t.steps * t.grad_accum * t.batch_size * _num_processes()
    if needed >= len(windows):
        return windows
    chosen = torch.sort(epoch_order(len(windows), t.seed, -1)[:needed]).values
    return windows[chosen]


def _num_processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _make_student(loaded, rec: DistillRecipe, windows: torch.Tensor, progress: bool):
    from llmquant.distill.student import make_student, student_from_config

    s = rec.student
    if s.config is not None:
        _say(progress, f"student: a fresh model from {s.config}")
        return student_from_config(s.config, loaded.tokenizer), None
    if s.init is not None:
        from llmquant.loading import load_model

        start = load_model(s.init, dtype="float32")
        if start.quantization_config is not None:
            raise InvalidConfigError(f"{s.init} is quantized: start from its float model (e.g. `llmquant prune`'s "
                                     "output) and add --qat-scheme to train it quantization-aware.")
        if len(start.tokenizer) != len(loaded.tokenizer):
            raise InvalidConfigError(f"{s.init} has another vocabulary ({len(start.tokenizer)} tokens) than the "
                                     f"teacher ({len(loaded.tokenizer)}).")
        _say(progress, f"student: {s.init} as it is")
        return start.model, None
    batches = windows[: rec.data.calibration_samples]
    student, plan = make_student(loaded.model, batches, num_layers=s.num_layers, keep_layers=s.keep_layers,
                                 intermediate_size=s.intermediate_size, num_key_value_heads=s.num_key_value_heads)
    _say(progress, f"student: kept layers {plan.kept_layers} of {plan.teacher_layers}"
         + (f", MLP {plan.intermediate_size[0]} -> {plan.intermediate_size[1]}" if plan.intermediate_size else "")
         + (f", KV groups {plan.kv_heads[0]} -> {plan.kv_heads[1]}" if plan.kv_heads else ""))
    return student, plan


def _teacher_cache(loaded, rec: DistillRecipe, windows, output: Path, endpoint_model, progress):
    from llmquant.distill.teacher_cache import TeacherCache, fill_from_endpoint, fill_from_model

    folder = Path(rec.teacher.cache) if rec.teacher.cache else output.parent / f"{output.name}.teacher-cache"
    if folder.exists():
        cache = TeacherCache.open(folder)
        if (cache.seq_len != rec.train.seq_len or len(cache) != len(windows)
                or not torch.equal(cache.input_ids(), windows)):
            raise InvalidConfigError(f"The teacher cache {folder} was built for other text or seq_len "
                                     f"({cache.seq_len}); remove it or point --teacher-cache elsewhere.")
        _say(progress, f"teacher: reading top-{cache.k} log-probs of {len(cache)} windows from {folder}")
        return cache
    if rec.teacher.endpoint:
        _say(progress, f"teacher: filling {folder} from {rec.teacher.endpoint} (top-{rec.teacher.top_k})")
        return fill_from_endpoint(rec.teacher.endpoint, loaded.tokenizer, windows, folder, k=rec.teacher.top_k,
                                  model=endpoint_model or rec.teacher.endpoint_model, progress=progress)
    _say(progress, f"teacher: computing top-{rec.teacher.top_k} log-probs of {len(windows)} windows into {folder}")
    return fill_from_model(loaded.model, windows, folder, k=rec.teacher.top_k, teacher=loaded.source.describe(),
                           batch_size=rec.train.batch_size, progress=progress)


def _resolve_qat(student, rec: DistillRecipe) -> dict:
    """The QAT scheme with the group size `llmquant quantize` would choose for this student."""
    from llmquant.distill.fake_quant import QAT_OBSERVER
    from llmquant.quant.pipeline.plan import auto_group_size
    from llmquant.quant.pipeline.quantize import build_recipe
    from llmquant.quant.pipeline.targets import linear_layers

    q = rec.qat
    qrec = build_recipe(scheme=q.scheme, group_size=q.group_size, symmetric=q.symmetric, observer=QAT_OBSERVER,
                        smoothquant=False)
    layers = list(linear_layers(student, qrec.targets, qrec.ignore))
    if q.group_size is None:
        qrec, _ = auto_group_size(qrec, layers)
    return {"scheme": qrec.scheme, "group_size": qrec.scheme.weights.group_size}


def _qat_with_group(rec: DistillRecipe, qat_plan: dict):
    import dataclasses

    return dataclasses.replace(rec.qat, group_size=qat_plan["group_size"])


def _held_out_perplexity(tokenizer, rec: DistillRecipe):
    def evaluate(model) -> float:
        from llmquant.eval.perplexity import perplexity

        # split="held-out": the training file's held-out part, never the whole file it trains on.
        return perplexity((model, tokenizer), split="held-out", dataset=rec.data.dataset,
                          text_field=rec.data.text_field,
                          config_name=rec.data.config_name, max_tokens=rec.train.eval_tokens,
                          window=min(rec.train.seq_len * 2, 1024), progress=False).perplexity
    return evaluate


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr)
