"""Self-distillation: the original model teaches its own quantized copy, training only what the
checkpoint format lets change (learnable_quant.py), so the result is the same compressed-tensors
checkpoint. Anchors: mlx-lm's DWQ, EfficientQAT (block-wise, then end-to-end), AutoRound.

Two phases, on the calibration split:
1. block-wise (`block_steps` per decoder layer): each quantized layer learns to reproduce the
   original layer's outputs (normalized MSE), its inputs being what the already-trained quantized
   layers before it produce, so later layers also correct the error that reaches them;
2. end-to-end (`steps`): forward KL from the original's top-k next-token log-probs (an offline
   cache, so the original need not stay in memory) to the quantized model's, through the
   distillation Trainer (progress bar, resumable checkpoints, Ctrl-C); or, with `loss: ce`, plain
   next-token cross-entropy on the same windows (no teacher), to show what the teacher adds.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmquant.arch.layers import find_decoder_layers
from llmquant.config.self_distill import SelfDistillConfig
from llmquant.distill.learnable_quant import LearnableQuantLinear
from llmquant.errors import InvalidConfigError
from llmquant.quant.linear import QuantizedLinear
from llmquant.quant.pipeline.sequential import capture_first_inputs
from llmquant.quant.pipeline.targets import set_submodule


@dataclass
class SelfDistillResult:
    config: dict
    trainable_parameters: int
    block: list[dict] = field(default_factory=list)     # per decoder layer: loss before / after
    history: list[dict] = field(default_factory=list)   # end-to-end, per optimizer step
    seconds_block: float = 0.0
    seconds_end_to_end: float = 0.0
    seconds_per_step: float | None = None
    changed_codes: int = 0                              # integer codes the rounding offsets moved
    resumed_from: str | None = None

    def to_dict(self) -> dict:
        return {"config": self.config, "trainable_parameters": self.trainable_parameters, "block": self.block,
                "history": self.history, "seconds_block": self.seconds_block,
                "seconds_end_to_end": self.seconds_end_to_end, "seconds_per_step": self.seconds_per_step,
                "changed_codes": self.changed_codes, "resumed_from": self.resumed_from}


# The original's top-k log-probs inside the work folder (filled here from the original model,
# or beforehand from a served teacher: llmquant.distill.self_api).
TEACHER_CACHE = "teacher-topk"


# ---- the trainable model ---------------------------------------------------------------------
def is_norm(module: nn.Module) -> bool:
    """RMSNorm / LayerNorm of any architecture (their class names say so) with a weight."""
    from torch.nn.utils import parametrize

    return "norm" in type(module).__name__.lower() and (
        isinstance(getattr(module, "weight", None), nn.Parameter) or parametrize.is_parametrized(module, "weight"))


class _AsStored(nn.Module):
    """A norm weight as the checkpoint stores it (rounded to `dtype`), identity gradient: training
    sees the values it will be saved as, as the scales do (learnable_quant._CastSTE)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, w: Tensor) -> Tensor:
        return w + (w.to(self.dtype).to(w.dtype) - w).detach()


def make_learnable(model: nn.Module, train: tuple[str, ...]) -> list[str]:
    """Freeze everything, then turn every QuantizedLinear into a LearnableQuantLinear (and unfreeze
    the norms when asked, trained through their stored dtype). Returns the quantized layers' names."""
    model.requires_grad_(False)
    names = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    if not names:
        raise InvalidConfigError("The model holds no quantized layer: self-distillation trains a quantized "
                                 "model's scales; quantize it first.")
    for name in names:
        set_submodule(model, name, LearnableQuantLinear(model.get_submodule(name), train))
    if "norms" in train:
        from torch.nn.utils import parametrize

        for m in model.modules():
            if is_norm(m) and not parametrize.is_parametrized(m, "weight"):
                stored = m.weight.dtype
                m.weight.requires_grad_(True)
                parametrize.register_parametrization(m, "weight", _AsStored(stored))
    return names


def export_learnable(model: nn.Module) -> int:
    """Every LearnableQuantLinear back to a QuantizedLinear with its trained values; returns how
    many integer codes the rounding offsets moved."""
    from torch.nn.utils import parametrize

    moved = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, LearnableQuantLinear):
            moved += m.changed_codes()
            set_submodule(model, name, m.export())
        elif parametrize.is_parametrized(m, "weight") and any(isinstance(p, _AsStored)
                                                              for p in m.parametrizations["weight"]):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)  # the stored values
    model.requires_grad_(False)
    return moved


def param_groups(module: nn.Module, cfg: SelfDistillConfig) -> list[dict]:
    """Optimizer groups: log-scales and norms at `lr` (relative steps), zero points and rounding
    offsets at `rounding_lr` (steps in units of one integer code)."""
    scales, codes, seen = [], [], set()
    for m in module.modules():
        if isinstance(m, LearnableQuantLinear):
            groups = m.trainable_groups()
            scales += groups["scales"]
            codes += groups["codes"]
            seen.update(id(p) for p in groups["scales"] + groups["codes"])
    norms = [p for m in module.modules() if is_norm(m) for p in m.parameters()
             if p.requires_grad and id(p) not in seen]
    out = [{"params": scales + norms, "lr": cfg.lr}, {"params": codes, "lr": cfg.rounding_lr}]
    return [g for g in out if g["params"]]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- phase 1: block-wise ---------------------------------------------------------------------
def _plain(obj):
    """Captured layer arguments as ordinary tensors (they were captured under inference_mode, which
    autograd refuses to save for backward)."""
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, tuple):
        return tuple(_plain(o) for o in obj)
    if isinstance(obj, list):
        return [_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _hidden(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _autocast(device: torch.device):
    if device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def normalized_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error per position over the teacher's mean square (layers of any scale weigh alike)."""
    s, t = student.float(), teacher.float()
    return ((s - t).pow(2).mean(-1) / t.pow(2).mean(-1).clamp_min(1e-6)).mean()


def blockwise(student: nn.Module, teacher: nn.Module, windows: Tensor, cfg: SelfDistillConfig, *,
              progress: bool = True) -> list[dict]:
    """Phase 1 (module docstring). Returns, per decoder layer, the output error before and after."""
    _, s_layers = find_decoder_layers(student)
    _, t_layers = find_decoder_layers(teacher)
    if len(s_layers) != len(t_layers):
        raise InvalidConfigError(f"The quantized model has {len(s_layers)} decoder layers and the original "
                                 f"{len(t_layers)}: self-distillation needs the original of this very model.")
    device = next(student.parameters()).device
    s_calls = _plain(capture_first_inputs(student, s_layers[0], windows, cfg.batch_size, device).calls)
    t_calls = _plain(capture_first_inputs(teacher, t_layers[0], windows, cfg.batch_size, device).calls)
    generator = torch.Generator().manual_seed(cfg.seed)
    report = []
    bar = tqdm(total=len(s_layers) * cfg.block_steps, desc="self-distill: layer by layer", unit="step",
               disable=not progress, dynamic_ncols=True)
    try:
        for k, (s_layer, t_layer) in enumerate(zip(s_layers, t_layers)):
            with torch.no_grad(), _autocast(device):
                targets = [_hidden(t_layer(*a, **kw)).float() for a, kw in t_calls]
            groups = param_groups(s_layer, cfg)
            before = _block_error(s_layer, s_calls, targets, device)
            start = [p.detach().clone() for g in groups for p in g["params"]]
            if groups:
                _train_block(s_layer, groups, s_calls, targets, cfg, generator, device, bar)
            outputs = _outputs(s_layer, s_calls, device)  # the next layer's inputs, and this one's error
            after = _mean_error(outputs, targets)
            kept = after <= before
            if not kept:  # never worse than where it started, on the windows it trained on
                with torch.no_grad():
                    for p, p0 in zip((p for g in groups for p in g["params"]), start):
                        p.copy_(p0)
                outputs = _outputs(s_layer, s_calls, device)
            report.append({"layer": k, "error_before": before, "error_after": min(before, after),
                           "trained_error": after, "kept": kept})
            bar.set_postfix_str(f"layer {k}: {before:.4f} -> {min(before, after):.4f}", refresh=False)
            s_calls = [((y.to(a[0].dtype),) + tuple(a[1:]), kw) for y, (a, kw) in zip(outputs, s_calls)]
            t_calls = [((y.to(a[0].dtype),) + tuple(a[1:]), kw) for y, (a, kw) in zip(targets, t_calls)]
    finally:
        bar.close()
    return report


def _outputs(layer: nn.Module, calls, device) -> list[Tensor]:
    with torch.no_grad(), _autocast(device):
        return [_hidden(layer(*a, **kw)) for a, kw in calls]


def _mean_error(outputs: list[Tensor], targets: list[Tensor]) -> float:
    return sum(float(normalized_mse(o, y)) for o, y in zip(outputs, targets)) / len(outputs)


def _block_error(layer: nn.Module, calls, targets, device) -> float:
    return _mean_error(_outputs(layer, calls, device), targets)


def _train_block(layer, groups, calls, targets, cfg: SelfDistillConfig, generator, device, bar) -> None:
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0, foreach=False)
    total = cfg.block_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    layer.train()
    for _ in range(total):
        i = int(torch.randint(len(calls), (1,), generator=generator))
        a, kw = calls[i]
        with _autocast(device):
            loss = normalized_mse(_hidden(layer(*a, **kw)), targets[i])
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
    layer.eval()


# ---- phase 2: end-to-end ---------------------------------------------------------------------
def distill_recipe(cfg: SelfDistillConfig, mixed_precision: str, save_every: int = 0):
    """The distillation Trainer's recipe for the end-to-end phase."""
    from llmquant.distill.recipe import DistillRecipe, LossConfig, TeacherConfig, TrainConfig

    return DistillRecipe(
        loss=LossConfig(divergence="forward_kl_tail", temperature=1.0, kd_weight=1.0 if cfg.loss == "kl" else 0.0),
        teacher=TeacherConfig(mode="offline", top_k=cfg.top_k),
        train=TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr,
                          warmup_steps=min(10, max(1, cfg.steps // 10)), seed=cfg.seed,
                          mixed_precision=mixed_precision, max_grad_norm=None, save_every=save_every))


def end_to_end(student: nn.Module, windows: Tensor, cfg: SelfDistillConfig, *, cache=None,
               checkpoint_dir: Path | None = None, resume: bool = False, progress: bool = True, on_step=None):
    """Phase 2 (module docstring) through the distillation Trainer; returns its TrainResult."""
    from llmquant.distill.trainer import Trainer

    if cfg.loss == "kl" and cache is None:
        raise ValueError("the KL loss needs the original's top-k cache")
    device = next(student.parameters()).device
    mixed = "bf16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else "fp16"
    # With a checkpoint folder, a resumable checkpoint about every tenth of the run (and on Ctrl-C).
    save_every = max(1, cfg.steps // 10) if checkpoint_dir is not None else 0
    trainer = Trainer(student, distill_recipe(cfg, mixed, save_every), windows=windows, cache=cache if cfg.loss == "kl" else None,
                      checkpoint_dir=checkpoint_dir, progress=progress, on_step=on_step,
                      param_groups=param_groups(student, cfg))
    result = trainer.train(resume=resume)
    return result


def teacher_cache(teacher: nn.Module, windows: Tensor, folder: Path, cfg: SelfDistillConfig, name: str,
                  progress: bool = True):
    """The original's top-k log-probs on the training windows (built once, reused on resume)."""
    from llmquant.distill.teacher_cache import TeacherCache, fill_from_model

    if folder.exists():
        cache = TeacherCache.open(folder)
        if cache.k == cfg.top_k and torch.equal(cache.input_ids(), windows):
            return cache
        raise InvalidConfigError(f"{folder} holds the original's predictions for other text or top_k; remove it.")
    with torch.no_grad():
        return fill_from_model(teacher, windows, folder, k=cfg.top_k, batch_size=cfg.batch_size, teacher=name,
                               progress=progress)


# ---- both phases -----------------------------------------------------------------------------
def run_self_distill(student: nn.Module, teacher: nn.Module | None, windows: Tensor, cfg: SelfDistillConfig, *,
                     teacher_name: str = "", work_dir: Path | None = None, checkpoint_dir: Path | None = None,
                     resume: bool = False, progress: bool = True, on_step=None) -> SelfDistillResult:
    """Train the quantized `student` in place (its QuantizedLinear layers come back trained).

    `teacher`: the original model (needed for the block-wise phase and the KL cache; may be None
    when `work_dir` already holds the cache and block_steps is 0). `work_dir` keeps the teacher
    cache (a temporary folder when None). `on_step(step, record)` after each end-to-end step (as
    in `llmquant.distill`). The student's float parts return to their dtype."""
    dtype = next(p for p in student.parameters() if p.is_floating_point()).dtype
    make_learnable(student, cfg.train)
    result = SelfDistillResult(config=cfg.to_dict(), trainable_parameters=count_trainable(student))
    try:
        with _work_folder(work_dir) as work:
            cache = None
            if cfg.steps and cfg.loss == "kl":
                if teacher is None and not (work / TEACHER_CACHE).exists():
                    raise ValueError("the KL loss needs the original model or its cache")
                cache = teacher_cache(teacher, windows, work / TEACHER_CACHE, cfg, teacher_name, progress)
            if cfg.block_steps and not (resume and checkpoint_dir is not None and _has_checkpoint(checkpoint_dir)):
                if teacher is None:
                    raise ValueError("the block-wise phase needs the original model")
                t = time.perf_counter()
                student.float()
                result.block = blockwise(student, teacher, windows, cfg, progress=progress)
                result.seconds_block = time.perf_counter() - t
            if cfg.steps:
                t = time.perf_counter()
                trained = end_to_end(student, windows, cfg, cache=cache, checkpoint_dir=checkpoint_dir,
                                     resume=resume, progress=progress, on_step=on_step)
                result.history, result.resumed_from = trained.history, trained.resumed_from
                result.seconds_end_to_end = time.perf_counter() - t
                result.seconds_per_step = trained.seconds_per_step
    finally:
        result.changed_codes = export_learnable(student)
        student.to(dtype)
    return result


def _has_checkpoint(folder: Path) -> bool:
    from llmquant.distill.resume import latest_checkpoint

    return latest_checkpoint(folder) is not None


@contextlib.contextmanager
def _work_folder(folder: Path | None):
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="llmquant-self-distill-") as tmp:
        yield Path(tmp)
