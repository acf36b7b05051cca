"""What the steps of a quantize run share: the model, its layer plans, the calibration data,
and what each step measured and used.

Every step that feeds data through the model records a `DataPass` (which step, what for, how
many samples of how many tokens, from which split), so the report states what each pass used
rather than one line for the whole run.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field

import torch

from llmquant.config.options import RunOptions
from llmquant.config.recipe import Recipe
from llmquant.quant.pipeline.plan import LayerPlan
from llmquant.quant.pipeline.report import LayerReport

REPORT_PASS_SAMPLES = 8  # dynamic schemes need no calibration; a few samples feed the activation report


@dataclass
class DataPass:
    """One pass of text through the model: which step, what for, and how much it read."""

    step: str  # "mixed_precision", "smoothquant", "awq", "sparsity", "gptq", "static_scales",
    # "activation_report", "self_distill", "verification"
    purpose: str  # in words, for the report
    samples: int
    seq_len: int
    dataset: str
    split: str  # "calibration" or "held-out"
    seed: int | None = None  # which calibration windows were drawn (None: the held-out text is read in order)

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_len

    def describe(self) -> str:
        seed = f", seed {self.seed}" if self.seed is not None else ""
        return (f"{self.purpose}: {self.samples} x {self.seq_len} tokens from {self.dataset} "
                f"({self.split} split{seed})")

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens": self.tokens}


@dataclass
class StepContext:
    """The state a run's steps read and add to; pipeline/steps.py runs them in recipe order."""

    net: torch.nn.Module
    tokenizer: object
    loaded: object  # the LoadedModel: its source and stored dtype
    recipe: Recipe
    plans: list[LayerPlan]
    run: RunOptions
    stats: dict = field(default_factory=dict)  # layer name -> activation statistics (observers)
    layer_reports: dict[str, LayerReport] = field(default_factory=dict)  # layers a step has quantized
    experts: object | None = None  # ExpertCalibration of the rounding step's activation pass (MoE)
    smoothing: object | None = None  # SmoothingResult of SmoothQuant or AWQ
    mixed: dict | None = None  # mixed precision's choice, for the report
    passes: list[DataPass] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    after_save: list = field(default_factory=list)  # callables run once the checkpoint is in place
    teacher: torch.nn.Module | None = None  # self-distillation: the original model, copied before the first step
    self_distill: dict | None = None  # self-distillation's result, for the report
    pruning: dict | None = None  # the pruning step's per-layer reports (name -> dict), without GPTQ
    _batches: torch.Tensor | None = None

    @property
    def progress(self) -> bool:
        return self.run.progress

    def say(self, message: str) -> None:
        if self.run.progress:
            print(message, file=sys.stderr)

    @property
    def quantized(self) -> set[str]:
        """The layers the plan quantizes (full-precision ones excluded)."""
        return {p.name for p in self.plans if p.scheme is not None}

    def calibration_batches(self, limit: int | None = None) -> torch.Tensor:
        """The calibration windows, (samples, seq_len) token ids: all `num_samples` of them, or the
        first `limit`. Drawn once; a later step that needs fewer gets the leading ones."""
        from llmquant.data import calibration_batches

        cal = self.recipe.calibration
        wanted = cal.num_samples if limit is None else min(limit, cal.num_samples)
        if self._batches is None or self._batches.shape[0] < wanted:
            self._batches = calibration_batches(self.tokenizer, cal.dataset, num_samples=wanted, seq_len=cal.seq_len,
                                                seed=cal.seed, text_field=cal.text_field,
                                                config_name=cal.config_name)
        return self._batches[:wanted]

    def record(self, step: str, purpose: str, batches: torch.Tensor) -> DataPass:
        """Note that `step` fed these calibration windows through the model."""
        cal = self.recipe.calibration
        done = DataPass(step=step, purpose=purpose, samples=int(batches.shape[0]), seq_len=int(batches.shape[1]),
                        dataset=cal.dataset, split="calibration", seed=cal.seed)
        self.passes.append(done)
        self.say(f"{purpose} on {done.samples} x {done.seq_len} calibration tokens")
        return done
