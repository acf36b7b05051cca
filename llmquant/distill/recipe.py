"""Distillation recipes: a YAML file and its Python object are the same thing.

    student: {num_layers: 15}              # or keep_layers: [...], intermediate_size, num_key_value_heads,
                                           # or config: student.json (a fresh model of any architecture)
    loss: {divergence: forward_kl, temperature: 2.0, kd_weight: 0.9, beta: 0.5,
           hidden_weight: 0.0, hidden_layers: null}
    teacher: {mode: offline, cache: null, top_k: 32, endpoint: null, endpoint_model: null}
    train: {steps: 200, batch_size: 4, grad_accum: 1, seq_len: 256, lr: 1.0e-4, ...}
    data: {dataset: builtin, text_field: text, config_name: null, calibration_samples: 16}
    qat: null                              # or {scheme: W4A16, group_size: 64, symmetric: true}

Every section rejects unknown keys with the list of valid ones; `DistillRecipe.from_dict(
r.to_dict()) == r`, and the recipe.yaml saved with a student reproduces its run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmquant.distill.losses import DIVERGENCES
from llmquant.errors import InvalidConfigError
from llmquant.config.args import reject_unknown_keys

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw_8bit")
MIXED_PRECISION = ("no", "bf16", "fp16")
TEACHER_MODES = ("online", "offline")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidConfigError(message)


class _Section:
    @classmethod
    def from_dict(cls, data: dict | None, where: str):
        data = dict(data or {})
        if not isinstance(data, dict):
            raise InvalidConfigError(f"{where} must be a mapping.")
        reject_unknown_keys(data, {f.name for f in dataclasses.fields(cls)}, where)
        try:
            return cls(**data)
        except TypeError as e:
            raise InvalidConfigError(f"{where}: {e}") from None


@dataclass(frozen=True)
class StudentConfig(_Section):
    num_layers: int | None = None         # keep this many decoder layers, chosen by importance
    keep_layers: list[int] | None = None  # or exactly these
    intermediate_size: int | None = None  # prune MLP neurons to this many per layer
    num_key_value_heads: int | None = None  # prune KV groups (with their query heads)
    config: str | None = None             # or a fresh model from this config (json/yaml)
    init: str | None = None               # or this model folder as it is (e.g. `llmquant prune`'s output):
    #                                       its pruned (zero) weights stay zero through training

    def __post_init__(self) -> None:
        _check(not (self.num_layers is not None and self.keep_layers is not None),
               "student: give num_layers or keep_layers, not both.")
        pruning = any(v is not None for v in (self.num_layers, self.keep_layers, self.intermediate_size,
                                              self.num_key_value_heads))
        _check(not (pruning and self.config), "student: a config builds a fresh model; it cannot be combined "
               "with pruning the teacher (num_layers, keep_layers, intermediate_size, num_key_value_heads).")
        _check(not (self.init and (pruning or self.config)), "student: init starts from a model folder as it is; "
               "it cannot be combined with config or with pruning the teacher.")
        for name in ("num_layers", "intermediate_size", "num_key_value_heads"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, int) and v >= 1), f"student.{name} must be a positive integer.")
        if self.keep_layers is not None:
            object.__setattr__(self, "keep_layers", [int(i) for i in self.keep_layers])

    @property
    def is_empty(self) -> bool:
        return all(v is None for v in dataclasses.asdict(self).values())


@dataclass(frozen=True)
class LossConfig(_Section):
    divergence: str = "forward_kl"   # forward_kl | reverse_kl | jsd | forward_kl_tail (top-k + the rest)
    temperature: float = 2.0
    kd_weight: float = 0.9           # loss = (1 - kd_weight) * CE + kd_weight * divergence
    beta: float = 0.5                # generalized JSD mixture weight
    hidden_weight: float = 0.0       # + hidden_weight * hidden-state loss (online teacher only)
    hidden_layers: list[list[int]] | None = None  # [[student_layer, teacher_layer], ...]; null: spread evenly

    def __post_init__(self) -> None:
        _check(self.divergence in DIVERGENCES,
               f"loss.divergence must be one of {', '.join(DIVERGENCES)}; got {self.divergence!r}.")
        _check(self.temperature > 0, "loss.temperature must be positive.")
        _check(self.divergence != "forward_kl_tail" or self.temperature == 1.0,
               "loss.divergence forward_kl_tail compares the cached log-probs as they are: use temperature 1.0.")
        _check(0.0 <= self.kd_weight <= 1.0, "loss.kd_weight must be in [0, 1] (0: cross-entropy only).")
        _check(0.0 < self.beta < 1.0, "loss.beta must be in (0, 1).")
        _check(self.hidden_weight >= 0, "loss.hidden_weight must be >= 0.")


@dataclass(frozen=True)
class TeacherConfig(_Section):
    mode: str = "online"             # online: teacher runs each step; offline: reads a top-k cache
    cache: str | None = None         # offline cache folder (built there when it does not exist)
    top_k: int = 32
    endpoint: str | None = None      # fill the cache from an OpenAI-compatible URL (.../v1)
    endpoint_model: str | None = None

    def __post_init__(self) -> None:
        _check(self.mode in TEACHER_MODES, f"teacher.mode must be one of {', '.join(TEACHER_MODES)}.")
        _check(self.top_k >= 1, "teacher.top_k must be >= 1.")
        _check(self.endpoint is None or self.mode == "offline",
               "teacher.endpoint fills an offline cache: set teacher.mode: offline.")
        _check(self.endpoint is None or self.top_k <= 20,
               "an OpenAI-compatible endpoint returns at most 20 top log-probs: teacher.top_k <= 20.")


@dataclass(frozen=True)
class TrainConfig(_Section):
    steps: int = 200                 # optimizer steps
    batch_size: int = 4              # sequences per micro-batch
    grad_accum: int = 1              # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 1.0e-4
    min_lr_ratio: float = 0.1        # cosine/linear decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "cosine"
    optimizer: str = "adamw"         # adamw | adamw_8bit (bitsandbytes, CUDA)
    mixed_precision: str = "bf16"    # no | bf16 | fp16 (accelerate autocast; master weights fp32)
    max_grad_norm: float | None = 1.0
    eval_every: int = 0              # held-out perplexity every N steps (0: only at the end)
    eval_tokens: int = 8192
    save_every: int = 0              # resumable checkpoint every N steps (0: only on Ctrl-C / the end)
    seed: int = 0
    max_train_tokens: int | None = None  # read at most this many tokens of the training split

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_tokens"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                   f"train.{name} must be a positive integer.")
        _check(self.lr > 0, "train.lr must be positive.")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1].")
        _check(self.warmup_steps >= 0 and self.eval_every >= 0 and self.save_every >= 0,
               "train.warmup_steps, eval_every and save_every must be >= 0.")
        _check(self.schedule in SCHEDULES, f"train.schedule must be one of {', '.join(SCHEDULES)}.")
        _check(self.optimizer in OPTIMIZERS, f"train.optimizer must be one of {', '.join(OPTIMIZERS)}.")
        _check(self.mixed_precision in MIXED_PRECISION,
               f"train.mixed_precision must be one of {', '.join(MIXED_PRECISION)}.")


@dataclass(frozen=True)
class DataConfig(_Section):
    dataset: str = "builtin"
    text_field: str = "text"
    config_name: str | None = None
    calibration_samples: int = 16    # windows that rank layers / neurons when pruning

    def __post_init__(self) -> None:
        _check(self.calibration_samples >= 1, "data.calibration_samples must be >= 1.")


@dataclass(frozen=True)
class QATConfig(_Section):
    scheme: str = "W4A16"            # a `llmquant quantize` scheme with dynamic or no activations
    group_size: int | None = None    # INT4 group size (default: the scheme's, or one that fits)
    symmetric: bool | None = None

    def __post_init__(self) -> None:
        from llmquant.config.presets import preset

        scheme = preset(self.scheme)
        object.__setattr__(self, "scheme", self.scheme.upper())
        _check(not scheme.has_static_activations,
               f"qat.scheme {self.scheme} calibrates static activation scales; use W8A8, FP8_DYNAMIC or a "
               "weight-only scheme, and quantize with static activations afterwards if wanted.")


@dataclass(frozen=True)
class DistillRecipe:
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    qat: QATConfig | None = None

    _SECTIONS = {"student": StudentConfig, "loss": LossConfig, "teacher": TeacherConfig,
                 "train": TrainConfig, "data": DataConfig, "qat": QATConfig}

    def __post_init__(self) -> None:
        _check(not (self.loss.hidden_weight > 0 and self.teacher.mode == "offline"),
               "loss.hidden_weight needs the teacher's hidden states: use teacher.mode: online.")

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in ("student", "loss", "teacher", "train",
                                                                          "data")}
        out["qat"] = dataclasses.asdict(self.qat) if self.qat else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "DistillRecipe":
        data = data or {}
        if not isinstance(data, dict):
            raise InvalidConfigError("A distillation recipe must be a mapping of sections.")
        reject_unknown_keys(data, set(cls._SECTIONS), "the distillation recipe")
        kwargs = {}
        for name, section in cls._SECTIONS.items():
            if name not in data:
                continue
            if name == "qat" and data[name] is None:
                kwargs[name] = None
                continue
            kwargs[name] = section.from_dict(data[name], name)
        return cls(**kwargs)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DistillRecipe":
        path = Path(path)
        if not path.is_file():
            raise InvalidConfigError(f"Recipe file {path} does not exist.")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise InvalidConfigError(f"{path} is not valid YAML: {e}") from None
        try:
            return cls.from_dict(data)
        except InvalidConfigError as e:
            raise InvalidConfigError(f"{path}: {e}") from None

    def replace(self, section: str, **changes) -> "DistillRecipe":
        """A copy with fields of one section changed (None values are ignored)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self
        current = getattr(self, section)
        if current is None:  # qat
            current = self._SECTIONS[section]()
        merged = {**dataclasses.asdict(current), **changes}
        return dataclasses.replace(self, **{section: self._SECTIONS[section].from_dict(merged, section)})
