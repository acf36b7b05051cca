"""Recipes: a YAML file and its Python object are the same thing.

    quantize:
      scheme: W4A16            # a preset; `weights` / `input_activations` override its fields
      weights: {group_size: 64, observer: mse}
      targets: [Linear]
      ignore: [lm_head]
      group_size_fallback: error   # error | channel | skip
    smoothquant:               # activation schemes; absent: the scheme's default (W8A8: auto),
      alpha: auto              # null: off; alpha: a number in [0, 1] or auto
    awq:                       # weight-only schemes: activation-aware per-channel scales, before gptq
      grid: 20                 # alphas searched: 0, 1/grid, ..., 1
    mixed_precision:           # weight-only schemes: per-layer choice between the scheme and `high`
      target_bits: 5.0         # average bits per weight (scales included), or max_ppl_increase: 10
      high: W8A16
      samples: 2               # calibration windows for the per-layer sensitivity
    gptq:                      # absent/null: plain rounding; runs after smoothquant when both are set
      block_size: 128
      dampening: 0.01
      act_order: true
      weighted_clipping: true  # INT scales: clipping chosen by the output error it causes
      refit_rounds: 1          # least-squares refits of the INT scales to the rounded values
    calibration:
      dataset: builtin
      num_samples: 128
      seq_len: 512
      seed: 0
      moe_calibration: routed  # MoE experts: routed tokens (fallback below min_expert_tokens) | all
      min_expert_tokens: 128

`Recipe.to_dict()` writes every field explicitly, so `Recipe.from_dict(r.to_dict()) == r`
and the recipe.yaml saved next to a checkpoint reproduces it exactly. Unknown keys are
rejected with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmquant.errors import InvalidConfigError
from llmquant.config.args import QuantArgs, QuantScheme, reject_unknown_keys
from llmquant.config.presets import PRESETS, SMOOTHQUANT_BY_DEFAULT, preset
from llmquant.quant.pipeline.targets import validate_patterns

GROUP_SIZE_FALLBACKS = ("error", "channel", "skip")
MOE_CALIBRATION_MODES = ("routed", "all")


@dataclass(frozen=True)
class CalibrationConfig:
    dataset: str = "builtin"
    config_name: str | None = None
    text_field: str = "text"
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    # MoE experts: statistics from the tokens routed to each expert ("routed"), or from every
    # calibration token ("all"); in "routed", an expert routed fewer than min_expert_tokens
    # tokens falls back to every token (expert_calibration.py).
    moe_calibration: str = "routed"
    min_expert_tokens: int = 128

    def __post_init__(self) -> None:
        for name in ("num_samples", "seq_len", "seed", "min_expert_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidConfigError(f"calibration.{name} must be an integer, got {value!r}.")
        if self.num_samples < 1 or self.seq_len < 8:
            raise InvalidConfigError("calibration needs num_samples >= 1 and seq_len >= 8.")
        if self.moe_calibration not in MOE_CALIBRATION_MODES:
            raise InvalidConfigError(f"calibration.moe_calibration must be one of {', '.join(MOE_CALIBRATION_MODES)}; "
                                     f"got {self.moe_calibration!r}.")
        if self.min_expert_tokens < 1:
            raise InvalidConfigError("calibration.min_expert_tokens must be at least 1.")

    @classmethod
    def from_dict(cls, data: dict) -> "CalibrationConfig":
        reject_unknown_keys(data, {f.name for f in dataclasses.fields(cls)}, "calibration")
        return cls(**data)


@dataclass(frozen=True)
class SmoothQuantConfig:
    # Migration strength: 0 keeps activations as they are, 1 moves all their range into the
    # weights; "auto" searches the best value per layer on the calibration data.
    alpha: float | str = "auto"

    def __post_init__(self) -> None:
        if self.alpha == "auto":
            return
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise InvalidConfigError(f"smoothquant.alpha must be 'auto' or a number between 0 and 1, "
                                     f"got {self.alpha!r}.")

    @classmethod
    def from_dict(cls, data: dict) -> "SmoothQuantConfig":
        if not isinstance(data, dict):
            raise InvalidConfigError("smoothquant must be a mapping such as {alpha: 0.5}.")
        reject_unknown_keys(data, {"alpha"}, "smoothquant")
        return cls(**data)


@dataclass(frozen=True)
class GPTQConfig:
    # Columns whose error feedback is applied one by one before one matrix product updates the
    # rest (speed only: any block size gives the same result up to float rounding).
    block_size: int = 128
    # Fraction of the Hessian's mean diagonal added to it, so that it can be inverted.
    dampening: float = 0.01
    # Round the most active input columns first (the permutation is undone before saving).
    act_order: bool = True
    # Pick each group's clipping by the error it causes on the calibration inputs (Hessian
    # diagonal weighted), not by the weights alone (gptq_scales.py). INT weights only.
    weighted_clipping: bool = True
    # Least-squares refits of the INT scales to the chosen codes (each after a GPTQ pass).
    refit_rounds: int = 1

    def __post_init__(self) -> None:
        for flag in ("act_order", "weighted_clipping"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidConfigError(f"gptq.{flag} must be true or false, got {getattr(self, flag)!r}.")
        if isinstance(self.refit_rounds, bool) or not isinstance(self.refit_rounds, int) or not 0 <= self.refit_rounds <= 8:
            raise InvalidConfigError(f"gptq.refit_rounds must be an integer from 0 to 8, got {self.refit_rounds!r}.")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise InvalidConfigError(f"gptq.block_size must be a positive integer, got {self.block_size!r}.")
        if (isinstance(self.dampening, bool) or not isinstance(self.dampening, (int, float))
                or not 0.0 < self.dampening <= 1.0):
            raise InvalidConfigError(f"gptq.dampening must be a number in (0, 1], got {self.dampening!r}.")

    def describe(self) -> str:
        extras = ["weighted clipping"] if self.weighted_clipping else []
        if self.refit_rounds:
            extras.append(f"{self.refit_rounds} scale refit" + ("s" if self.refit_rounds > 1 else ""))
        return (f"block {self.block_size}, dampening {self.dampening}, act_order {self.act_order}"
                + "".join(", " + e for e in extras))

    @classmethod
    def from_dict(cls, data: dict) -> "GPTQConfig":
        if not isinstance(data, dict):
            raise InvalidConfigError("gptq must be a mapping such as {block_size: 128, dampening: 0.01}.")
        reject_unknown_keys(data, {f.name for f in dataclasses.fields(cls)}, "gptq")
        return cls(**data)


@dataclass(frozen=True)
class AWQConfig:
    # Migration exponents searched per mapping: 0, 1/grid, ..., 1 (0 means no scaling).
    grid: int = 20

    def __post_init__(self) -> None:
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or not 1 <= self.grid <= 100:
            raise InvalidConfigError(f"awq.grid must be an integer from 1 to 100, got {self.grid!r}.")

    @classmethod
    def from_dict(cls, data: dict) -> "AWQConfig":
        if not isinstance(data, dict):
            raise InvalidConfigError("awq must be a mapping such as {grid: 20}.")
        reject_unknown_keys(data, {f.name for f in dataclasses.fields(cls)}, "awq")
        return cls(**data)


@dataclass(frozen=True)
class MixedPrecisionConfig:
    # Exactly one goal: an average number of bits per weight (scales included), or an estimated
    # perplexity increase in percent.
    target_bits: float | None = None
    max_ppl_increase: float | None = None
    high: str = "W8A16"  # the scheme sensitive layers move to
    samples: int = 2  # calibration windows the sensitivities are measured on

    def __post_init__(self) -> None:
        if (self.target_bits is None) == (self.max_ppl_increase is None):
            raise InvalidConfigError("mixed_precision needs exactly one of target_bits or max_ppl_increase.")
        if self.target_bits is not None and not 2.0 <= float(self.target_bits) <= 16.0:
            raise InvalidConfigError(f"mixed_precision.target_bits must be between 2 and 16, got {self.target_bits}.")
        if self.max_ppl_increase is not None and float(self.max_ppl_increase) <= 0:
            raise InvalidConfigError("mixed_precision.max_ppl_increase is a percentage above 0.")
        scheme = preset(self.high)
        if scheme.input_activations is not None:
            raise InvalidConfigError(f"mixed_precision.high must be a weight-only scheme, got {self.high}.")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise InvalidConfigError("mixed_precision.samples must be a positive integer.")

    @classmethod
    def from_dict(cls, data: dict) -> "MixedPrecisionConfig":
        if not isinstance(data, dict):
            raise InvalidConfigError("mixed_precision must be a mapping such as {target_bits: 5}.")
        reject_unknown_keys(data, {f.name for f in dataclasses.fields(cls)}, "mixed_precision")
        return cls(**data)


@dataclass(frozen=True)
class Recipe:
    scheme: QuantScheme
    scheme_name: str | None = None  # the preset it started from, for reports and model cards
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    group_size_fallback: str = "error"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    smoothquant: SmoothQuantConfig | None = None
    gptq: GPTQConfig | None = None
    awq: AWQConfig | None = None
    mixed_precision: MixedPrecisionConfig | None = None

    def __post_init__(self) -> None:
        if self.mixed_precision is not None and (self.scheme.input_activations is not None
                                                 or self.scheme.weights.type != "int"):
            raise InvalidConfigError("Mixed precision chooses between weight-only integer schemes "
                                     "(e.g. W4A16 and W8A16); use it with W4A16 or W4A16_ASYM.")
        if self.awq is not None and self.scheme.input_activations is not None:
            raise InvalidConfigError(
                "AWQ scaling is for weight-only schemes (W4A16, W8A16); schemes that quantize activations "
                "use SmoothQuant instead.")
        if self.smoothquant is not None and self.scheme.input_activations is None:
            raise InvalidConfigError(
                "SmoothQuant moves activation outliers into the weights: it helps schemes that quantize "
                f"activations (W8A8, FP8, FP8_DYNAMIC) and only hurts weight-only {self.name}.")
        if self.group_size_fallback not in GROUP_SIZE_FALLBACKS:
            raise InvalidConfigError(f"group_size_fallback must be one of {', '.join(GROUP_SIZE_FALLBACKS)}; "
                                     f"got {self.group_size_fallback!r}.")
        if not self.targets:
            raise InvalidConfigError("targets is empty: nothing would be quantized.")
        validate_patterns(self.targets, "targets")
        validate_patterns(self.ignore, "ignore")

    @property
    def name(self) -> str:
        return self.scheme_name or "custom"

    # ---- dict / YAML -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "quantize": {
                "scheme": self.scheme_name,
                "weights": self.scheme.weights.to_dict(),
                "input_activations": (self.scheme.input_activations.to_dict()
                                      if self.scheme.input_activations else None),
                "targets": list(self.targets),
                "ignore": list(self.ignore),
                "group_size_fallback": self.group_size_fallback,
            },
            "smoothquant": dataclasses.asdict(self.smoothquant) if self.smoothquant else None,
            "awq": dataclasses.asdict(self.awq) if self.awq else None,
            "mixed_precision": dataclasses.asdict(self.mixed_precision) if self.mixed_precision else None,
            "gptq": dataclasses.asdict(self.gptq) if self.gptq else None,
            "calibration": dataclasses.asdict(self.calibration),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        if not isinstance(data, dict):
            raise InvalidConfigError("A recipe must be a mapping with 'quantize' (and optionally 'calibration').")
        reject_unknown_keys(data, {"quantize", "smoothquant", "awq", "mixed_precision", "gptq", "calibration"}, "the recipe")
        q = dict(data.get("quantize") or {})
        reject_unknown_keys(q, {"scheme", "weights", "input_activations", "targets", "ignore",
                                "group_size_fallback"}, "quantize")
        name = q.get("scheme")
        base = preset(name) if name else None
        if base is None and not q.get("weights"):
            raise InvalidConfigError(f"The recipe needs quantize.scheme (one of {', '.join(PRESETS)}) "
                                     "or a full quantize.weights section.")
        weights = _merge_args(base.weights if base else None, q.get("weights"), "quantize.weights")
        if "input_activations" in q and q["input_activations"] is None:
            acts = None
        else:
            acts = _merge_args(base.input_activations if base else None, q.get("input_activations"),
                               "quantize.input_activations")
        kwargs = {k: tuple(q[k]) for k in ("targets", "ignore") if k in q}
        if "group_size_fallback" in q:
            kwargs["group_size_fallback"] = q["group_size_fallback"]
        calibration = CalibrationConfig.from_dict(dict(data.get("calibration") or {}))
        if "smoothquant" in data:
            sq = data["smoothquant"]
            smoothquant = SmoothQuantConfig.from_dict(sq) if sq is not None else None
        else:
            smoothquant = default_smoothquant(name, acts)
        gptq = GPTQConfig.from_dict(data["gptq"]) if data.get("gptq") is not None else None
        awq = AWQConfig.from_dict(data["awq"]) if data.get("awq") is not None else None
        mp = data.get("mixed_precision")
        mixed = MixedPrecisionConfig.from_dict(mp) if mp is not None else None
        return cls(scheme=QuantScheme(weights=weights, input_activations=acts),
                   scheme_name=name.upper() if name else None, calibration=calibration,
                   smoothquant=smoothquant, gptq=gptq, awq=awq,
                   mixed_precision=mixed, **kwargs)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InvalidConfigError(f"The recipe is not valid YAML: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise InvalidConfigError(f"Recipe file {path} does not exist.")
        try:
            return cls.from_yaml(path.read_text(encoding="utf-8"))
        except InvalidConfigError as e:
            raise InvalidConfigError(f"{path}: {e}") from None

    def with_overrides(self, *, weights: dict | None = None, input_activations: dict | None = None,
                       drop_activations: bool = False, **fields: Any) -> "Recipe":
        """A copy with some weight/activation args and recipe fields replaced (CLI flags).
        Fields given as None keep their value; smoothquant=False turns SmoothQuant off."""
        w = _merge_args(self.scheme.weights, weights, "weights") if weights else self.scheme.weights
        a = None if drop_activations else self.scheme.input_activations
        if input_activations and a is not None:
            a = _merge_args(a, input_activations, "input_activations")
        changes = {k: v for k, v in fields.items() if v is not None}
        for optional in ("smoothquant", "gptq", "awq", "mixed_precision"):
            if changes.get(optional) is False:
                changes[optional] = None
        return dataclasses.replace(self, scheme=QuantScheme(weights=w, input_activations=a), **changes)


def _merge_args(base: QuantArgs | None, overrides: dict | None, where: str) -> QuantArgs | None:
    if overrides is None:
        return base
    if not isinstance(overrides, dict):
        raise InvalidConfigError(f"{where} must be a mapping.")
    reject_unknown_keys(overrides, {f.name for f in dataclasses.fields(QuantArgs)}, where)
    merged = {**(base.to_dict() if base else {}), **overrides}
    # Switching to a non-group strategy drops the preset's group size instead of failing.
    if merged.get("strategy") != "group" and "group_size" not in overrides:
        merged["group_size"] = None
    return QuantArgs.from_dict(merged, where)


def default_smoothquant(scheme_name: str | None, activations: QuantArgs | None) -> SmoothQuantConfig | None:
    """The SmoothQuant a scheme gets when its recipe does not say (see presets.SMOOTHQUANT_BY_DEFAULT)."""
    if scheme_name and scheme_name.upper() in SMOOTHQUANT_BY_DEFAULT and activations is not None:
        return SmoothQuantConfig()
    return None


def recipe_from_scheme(name: str, **overrides) -> Recipe:
    scheme = preset(name)
    return Recipe(scheme=scheme, scheme_name=name.upper(),
                  smoothquant=default_smoothquant(name, scheme.input_activations)).with_overrides(**overrides)
