"""The distillation training loop, on `accelerate`.

One optimizer step = `grad_accum` micro-batches of `batch_size` windows. Each micro-batch's
loss is (1 - kd_weight) * next-token CE + kd_weight * divergence(student, teacher), plus
hidden_weight * hidden-state loss; the teacher is either run in the same step (online: full
vocabulary, hidden states available) or read from a top-k cache (offline).

`accelerate` supplies the device, mixed precision (autocast; master weights stay float32) and
multi-GPU data parallelism under `accelerate launch` (each process reads its own slice of
every step's micro-batches). Resumable checkpoints (resume.py) restore model, optimizer,
scheduler, data position and RNG; Ctrl-C writes one and stops.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from llmquant.distill import losses
from llmquant.distill.data import batch_indices
from llmquant.distill.recipe import DistillRecipe
from llmquant.distill.resume import latest_checkpoint, load_checkpoint, save_checkpoint, step_folder
from llmquant.distill.teacher_cache import PAD_LOGPROB, TeacherCache
from llmquant.errors import LLMQuantError, MissingDependencyError


class TrainingInterrupted(LLMQuantError):
    """Ctrl-C during training: a resumable checkpoint was written."""

    exit_code = 130


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)  # per optimizer step: step, loss, ce, kd, hidden, lr
    evals: list[dict] = field(default_factory=list)    # step, perplexity
    seconds: float = 0.0
    tokens: int = 0
    resumed_from: str | None = None
    timed_steps: int = 0                               # steps run in this session (not restored)

    @property
    def seconds_per_step(self) -> float:
        """Wall time per optimizer step of this session, periodic evaluations included."""
        return self.seconds / max(1, self.timed_steps)


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step `s` (0-based): linear warm-up, then decay."""
    def fn(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return fn


def build_optimizer(params, name: str, lr: float, weight_decay: float):
    if name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise MissingDependencyError("optimizer adamw_8bit needs bitsandbytes: pip install bitsandbytes "
                                         "(CUDA machines); or use optimizer: adamw.") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)


def hidden_layer_map(student_layers: int, teacher_layers: int, kept: list[int] | None,
                     explicit: list[list[int]] | None) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs whose outputs the hidden-state loss compares: the
    explicit list, else each kept layer with its origin (a pruned student), else evenly spread."""
    if explicit:
        return [(int(s), int(t)) for s, t in explicit]
    if kept is not None and len(kept) == student_layers:
        return list(enumerate(kept))
    return [(i, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)]


class Trainer:
    def __init__(self, student: nn.Module, recipe: DistillRecipe, *, windows: torch.Tensor | None = None,
                 teacher: nn.Module | None = None, cache: TeacherCache | None = None,
                 kept_layers: list[int] | None = None, checkpoint_dir: Path | None = None,
                 evaluate: Callable[[nn.Module], float] | None = None, progress: bool = True,
                 on_step: Callable[[int, dict], None] | None = None, param_groups: list[dict] | None = None,
                 masks: list[tuple[nn.Parameter, torch.Tensor]] | None = None):
        """`param_groups`: what the optimizer trains, as torch param groups with their own lr
        (self-distillation); by default every parameter of the student at the recipe's lr.
        `masks`: (weight, keep) pairs of a pruned student: after every step, the weight is zero
        wherever keep is False (prune/masks.zero_masks)."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        # accelerate keeps its settings in a process-wide singleton; a second run in the same
        # process (a benchmark, a notebook) may ask for another mixed precision.
        AcceleratorState._reset_state()
        self.recipe, self.train_cfg, self.loss_cfg = recipe, recipe.train, recipe.loss
        self.accelerator = Accelerator(mixed_precision=self.train_cfg.mixed_precision)
        self.cache = cache
        self.windows = cache.input_ids() if cache is not None else windows
        if self.windows is None:
            raise ValueError("training needs windows or a teacher cache")
        use_kd = self.loss_cfg.kd_weight > 0 or self.loss_cfg.hidden_weight > 0
        if use_kd and teacher is None and cache is None:
            raise ValueError("distillation needs a teacher model or a teacher cache")
        self.teacher = teacher if (use_kd and cache is None) else None
        self.checkpoint_dir, self.evaluate, self.progress, self.on_step = checkpoint_dir, evaluate, progress, on_step
        device = self.accelerator.device
        student = student.to(device=device, dtype=torch.float32)
        if self.teacher is not None:
            self.teacher.to(device).eval().requires_grad_(False)
        self.projections = nn.ModuleDict()
        self.layer_pairs: list[tuple[int, int]] = []
        if self.loss_cfg.hidden_weight > 0:
            self._build_projections(student, kept_layers, device)
        params = list(student.parameters()) + list(self.projections.parameters())
        if param_groups is not None:
            extra = list(self.projections.parameters())
            params = list(param_groups) + ([{"params": extra}] if extra else [])
        optimizer = build_optimizer(params, self.train_cfg.optimizer, self.train_cfg.lr,
                                    self.train_cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
            self.train_cfg.schedule, self.train_cfg.warmup_steps, self.train_cfg.steps, self.train_cfg.min_lr_ratio))
        self.model, self.optimizer = self.accelerator.prepare(student, optimizer)
        self.masks = [(p, m.to(p.device)) for p, m in (masks or [])]

    def _build_projections(self, student, kept, device) -> None:
        s_cfg, t_cfg = student.config, self.teacher.config
        self.layer_pairs = hidden_layer_map(s_cfg.num_hidden_layers, t_cfg.num_hidden_layers, kept,
                                            self.loss_cfg.hidden_layers)
        if s_cfg.hidden_size != t_cfg.hidden_size:
            for s, _ in self.layer_pairs:
                self.projections[str(s)] = nn.Linear(s_cfg.hidden_size, t_cfg.hidden_size, bias=False,
                                                     device=device)

    # ---- one micro-batch -------------------------------------------------------------------
    def _micro_loss(self, position: int) -> tuple[torch.Tensor, dict]:
        acc = self.accelerator
        idx = batch_indices(len(self.windows), self.train_cfg.batch_size, self.train_cfg.seed,
                            position * acc.num_processes + acc.process_index)
        want_hidden = self.loss_cfg.hidden_weight > 0
        if self.cache is not None:
            ids, top_ids, top_lp = (t.to(acc.device) for t in self.cache.get(idx))
        else:
            ids = self.windows[idx].to(acc.device)
        with acc.autocast():
            out = self.model(ids, use_cache=False, output_hidden_states=want_hidden)
        logits = out.logits[:, :-1]  # (B, T-1, V): row t predicts token t+1
        ce = losses.next_token_ce(logits, ids[:, 1:])
        parts = {"ce": ce}
        kd_w = self.loss_cfg.kd_weight
        if kd_w > 0:
            cfg = self.loss_cfg
            if self.cache is not None and cfg.divergence == "forward_kl":
                parts["kd"] = losses.sparse_forward_kl(logits, top_ids, top_lp, cfg.temperature)
            elif self.cache is not None and cfg.divergence == "forward_kl_tail":
                parts["kd"] = losses.sparse_forward_kl_tail(logits, top_ids, top_lp)
            elif self.cache is not None:
                # Reverse KL and JSD need the student's distribution on the same support as the
                # teacher's: both renormalized over the top-k (empty slots excluded on both sides).
                pad = top_lp <= PAD_LOGPROB / 2
                s = losses.sparse_teacher_view(logits.float(), top_ids).masked_fill(pad, PAD_LOGPROB)
                parts["kd"] = losses.divergence(cfg.divergence, s, top_lp, temperature=cfg.temperature,
                                                beta=cfg.beta)
            else:
                with torch.no_grad(), acc.autocast():
                    t_out = self.teacher(ids, use_cache=False, output_hidden_states=want_hidden)
                parts["kd"] = losses.divergence(cfg.divergence, logits, t_out.logits[:, :-1],
                                                temperature=cfg.temperature, beta=cfg.beta)
            loss = losses.mix(ce, parts["kd"], kd_w)
        else:
            loss = ce
        if want_hidden:
            if kd_w == 0:
                with torch.no_grad(), acc.autocast():
                    t_out = self.teacher(ids, use_cache=False, output_hidden_states=True)
            h = sum(losses.hidden_state_loss(out.hidden_states[s + 1], t_out.hidden_states[t + 1],
                                             self.projections[str(s)] if str(s) in self.projections else None)
                    for s, t in self.layer_pairs) / len(self.layer_pairs)
            parts["hidden"] = h
            loss = loss + self.loss_cfg.hidden_weight * h
        return loss, {k: float(v.detach()) for k, v in parts.items()}

    # ---- the loop ----------------------------------------------------------------------------
    def _state(self, step: int, history: list, evals: list, tokens: int) -> dict:
        return {"step": step, "micro_position": step * self.train_cfg.grad_accum, "tokens": tokens,
                "history": history, "evals": evals, "recipe": self.recipe.to_dict()}

    def save(self, step: int, history: list, evals: list, tokens: int) -> Path | None:
        if self.checkpoint_dir is None or not self.accelerator.is_main_process:
            return None
        return save_checkpoint(step_folder(self.checkpoint_dir, step), model=self.accelerator.unwrap_model(self.model),
                               extra=self.projections, optimizer=self.optimizer.optimizer, scheduler=self.scheduler,
                               state=self._state(step, history, evals, tokens))

    def train(self, resume: bool = False) -> TrainResult:
        cfg = self.train_cfg
        step, history, evals, tokens, resumed_from = 0, [], [], 0, None
        if resume and self.checkpoint_dir is not None and (last := latest_checkpoint(self.checkpoint_dir)):
            state = load_checkpoint(last, model=self.accelerator.unwrap_model(self.model), extra=self.projections,
                                    optimizer=self.optimizer.optimizer, scheduler=self.scheduler)
            step, history, evals, tokens = state["step"], state["history"], state["evals"], state["tokens"]
            resumed_from = str(last)
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.accelerator.num_processes
        bar = tqdm(total=cfg.steps, initial=step, desc="distill", unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        self.model.train()
        start, timed_steps = time.perf_counter(), 0
        try:
            while step < cfg.steps:
                record = self._optimizer_step(step)
                step += 1
                timed_steps += 1
                tokens += tokens_per_step
                history.append(record)
                elapsed = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.1e}",
                                tok_s=f"{timed_steps * tokens_per_step / elapsed:.0f}")
                if self.evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                    evals.append({"step": step, "perplexity": self._evaluate()})
                    bar.write(f"step {step}: held-out perplexity {evals[-1]['perplexity']:.3f}")
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    self.save(step, history, evals, tokens)
                if self.on_step is not None:
                    self.on_step(step, record)
        except KeyboardInterrupt:
            bar.close()
            self.optimizer.zero_grad(set_to_none=True)  # a half-accumulated step is redone on resume
            where = self.save(step, history, evals, tokens)
            raise TrainingInterrupted(
                f"Interrupted at step {step} of {cfg.steps}. " + (
                    f"A resumable checkpoint is in {where}; run the same command with --resume to continue."
                    if where else "No checkpoint directory was set, so nothing was saved.")) from None
        bar.close()
        seconds = time.perf_counter() - start
        if self.evaluate is not None:
            evals.append({"step": step, "perplexity": self._evaluate()})
        return TrainResult(steps=step, history=history, evals=evals, seconds=seconds,
                           tokens=tokens, resumed_from=resumed_from, timed_steps=timed_steps)

    def _optimizer_step(self, step: int) -> dict:
        cfg, acc = self.train_cfg, self.accelerator
        sums: dict[str, float] = {}
        total = 0.0
        for micro in range(cfg.grad_accum):
            last = micro == cfg.grad_accum - 1
            ctx = acc.no_sync(self.model) if not last else _null()
            with ctx:
                loss, parts = self._micro_loss(step * cfg.grad_accum + micro)
                acc.backward(loss / cfg.grad_accum)
            total += float(loss.detach()) / cfg.grad_accum
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(list(self.model.parameters()) + list(self.projections.parameters()),
                                cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self._hold_masks()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"step": step + 1, "loss": total, "lr": lr, **sums}

    def _hold_masks(self) -> None:
        """A pruned weight stays zero: the optimizer's update there (momentum, weight decay) is undone."""
        with torch.no_grad():
            for p, keep in self.masks:
                p.mul_(keep)

    def _evaluate(self) -> float:
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        try:
            with torch.no_grad():
                return float(self.evaluate(model))
        finally:
            model.train()

    def unwrapped_student(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
