"""Recipes: a YAML file and its Python object are the same thing.

    quantize:
      scheme: W4A16            # a preset; `weights` / `input_activations` override its fields
      weights: {group_size: 64, observer: mse}
      targets: [Linear]
      ignore: [lm_head]        # a list of patterns; one pattern may be a plain string (ignore: lm_head)
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
    self_distill:              # after rounding: the original teaches the quantized copy (config/self_distill.py)
      steps: 200
    sparsity:                  # pruning before rounding; inside GPTQ's pass when gptq is set (config/sparsity.py)
      method: sparsegpt
      pattern: "2:4"
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

from llmquant.config.args import QuantArgs, QuantScheme, reject_unknown_keys
from llmquant.config.fields import check_fields, check_mapping, check_value, choices, describe_value, described
from llmquant.config.presets import PRESETS, SMOOTHQUANT_BY_DEFAULT, preset
from llmquant.config.self_distill import SelfDistillConfig
from llmquant.config.sparsity import SparsityConfig
from llmquant.errors import InvalidConfigError
from llmquant.quant.pipeline.targets import validate_patterns

GROUP_SIZE_FALLBACKS = ("error", "channel", "skip")
MOE_CALIBRATION_MODES = ("routed", "all")
WEIGHT_ONLY_PRESETS = tuple(name for name, s in PRESETS.items() if s.input_activations is None)


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
    moe_calibration: str = field(default="routed", metadata=choices(MOE_CALIBRATION_MODES))
    min_expert_tokens: int = 128

    def __post_init__(self) -> None:
        check_fields(self, "calibration")
        if self.num_samples < 1 or self.seq_len < 8:
            raise InvalidConfigError("calibration needs num_samples >= 1 and seq_len >= 8.")
        if self.moe_calibration not in MOE_CALIBRATION_MODES:
            raise InvalidConfigError(f"calibration.moe_calibration must be one of {', '.join(MOE_CALIBRATION_MODES)}; "
                                     f"got {self.moe_calibration!r}.")
        if self.min_expert_tokens < 1:
            raise InvalidConfigError("calibration.min_expert_tokens must be at least 1.")

    @classmethod
    def from_dict(cls, data: dict) -> "CalibrationConfig":
        return cls(**check_mapping(cls, data, "calibration", example="{num_samples: 128, seq_len: 512}"))


@dataclass(frozen=True)
class SmoothQuantConfig:
    # Migration strength: 0 keeps activations as they are, 1 moves all their range into the
    # weights; "auto" searches the best value per layer on the calibration data.
    alpha: float | str = field(default="auto", metadata=described("'auto' or a number from 0 to 1"))

    def __post_init__(self) -> None:
        check_fields(self, "smoothquant")
        if self.alpha == "auto":
            return
        if isinstance(self.alpha, str) or not 0.0 <= self.alpha <= 1.0:
            raise InvalidConfigError(f"smoothquant.alpha must be 'auto' or a number between 0 and 1, "
                                     f"got {self.alpha!r}.")

    @classmethod
    def from_dict(cls, data: dict) -> "SmoothQuantConfig":
        return cls(**check_mapping(cls, data, "smoothquant", example="{alpha: 0.5}"))


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
    refit_rounds: int = field(default=1, metadata=choices(range(9)))

    def __post_init__(self) -> None:
        check_fields(self, "gptq")
        if not 0 <= self.refit_rounds <= 8:
            raise InvalidConfigError(f"gptq.refit_rounds must be an integer from 0 to 8, got {self.refit_rounds!r}.")
        if self.block_size < 1:
            raise InvalidConfigError(f"gptq.block_size must be a positive integer, got {self.block_size!r}.")
        if not 0.0 < self.dampening <= 1.0:
            raise InvalidConfigError(f"gptq.dampening must be a number in (0, 1], got {self.dampening!r}.")

    def describe(self) -> str:
        extras = ["weighted clipping"] if self.weighted_clipping else []
        if self.refit_rounds:
            extras.append(f"{self.refit_rounds} scale refit" + ("s" if self.refit_rounds > 1 else ""))
        return (f"block {self.block_size}, dampening {self.dampening}, act_order {self.act_order}"
                + "".join(", " + e for e in extras))

    @classmethod
    def from_dict(cls, data: dict) -> "GPTQConfig":
        return cls(**check_mapping(cls, data, "gptq", example="{block_size: 128, dampening: 0.01}"))


@dataclass(frozen=True)
class AWQConfig:
    # Migration exponents searched per mapping: 0, 1/grid, ..., 1 (0 means no scaling).
    grid: int = 20

    def __post_init__(self) -> None:
        check_fields(self, "awq")
        if not 1 <= self.grid <= 100:
            raise InvalidConfigError(f"awq.grid must be an integer from 1 to 100, got {self.grid!r}.")

    @classmethod
    def from_dict(cls, data: dict) -> "AWQConfig":
        return cls(**check_mapping(cls, data, "awq", example="{grid: 20}"))


@dataclass(frozen=True)
class MixedPrecisionConfig:
    # Exactly one goal: an average number of bits per weight (scales included), or an estimated
    # perplexity increase in percent.
    target_bits: float | None = None
    max_ppl_increase: float | None = None
    high: str = field(default="W8A16", metadata=choices(WEIGHT_ONLY_PRESETS))  # the scheme sensitive layers move to
    samples: int = 2  # calibration windows the sensitivities are measured on

    def __post_init__(self) -> None:
        check_fields(self, "mixed_precision")
        if (self.target_bits is None) == (self.max_ppl_increase is None):
            raise InvalidConfigError("mixed_precision needs exactly one of target_bits or max_ppl_increase.")
        if self.target_bits is not None and not 2.0 <= float(self.target_bits) <= 16.0:
            raise InvalidConfigError(f"mixed_precision.target_bits must be between 2 and 16, got {self.target_bits}.")
        if self.max_ppl_increase is not None and float(self.max_ppl_increase) <= 0:
            raise InvalidConfigError("mixed_precision.max_ppl_increase is a percentage above 0.")
        scheme = preset(self.high)
        if scheme.input_activations is not None:
            raise InvalidConfigError(f"mixed_precision.high must be a weight-only scheme "
                                     f"({', '.join(WEIGHT_ONLY_PRESETS)}), got {self.high}.")
        if self.samples < 1:
            raise InvalidConfigError("mixed_precision.samples must be a positive integer.")

    @classmethod
    def from_dict(cls, data: dict) -> "MixedPrecisionConfig":
        return cls(**check_mapping(cls, data, "mixed_precision", example="{target_bits: 5}"))


@dataclass(frozen=True)
class RoundingConfig:
    """Round-to-nearest of every planned layer that no earlier step quantized: always the last
    step of a recipe, so it has no section of its own."""


# The recipe's optional sections, each a step of the pipeline, in the order they run.
STEP_SECTIONS = ("mixed_precision", "smoothquant", "awq", "gptq")
SECTIONS = ("quantize", "smoothquant", "awq", "mixed_precision", "gptq", "self_distill", "sparsity", "calibration")
QUANTIZE_KEYS = ("scheme", "weights", "input_activations", "targets", "ignore", "group_size_fallback")
# Where each Recipe field lives in the YAML, for messages about a wrong type.
_YAML_PATHS = {"scheme_name": "quantize.scheme", "targets": "quantize.targets", "ignore": "quantize.ignore",
               "group_size_fallback": "quantize.group_size_fallback"}


def patterns(value: Any, where: str) -> tuple[str, ...]:
    """Module patterns from a recipe or an argument: a list of strings, or one string meaning
    that one pattern (`ignore: lm_head` is `ignore: [lm_head]`, never five one-letter ones)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InvalidConfigError(f"{where} must be a list of strings (module names, class names or re:REGEX), "
                             f"or one such string; got {describe_value(value)}.")


@dataclass(frozen=True)
class Recipe:
    scheme: QuantScheme
    scheme_name: str | None = field(default=None, metadata=choices(PRESETS))  # the preset it started from
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)
    group_size_fallback: str = field(default="error", metadata=choices(GROUP_SIZE_FALLBACKS))
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    smoothquant: SmoothQuantConfig | None = None
    gptq: GPTQConfig | None = None
    awq: AWQConfig | None = None
    mixed_precision: MixedPrecisionConfig | None = None
    self_distill: SelfDistillConfig | None = None
    sparsity: SparsityConfig | None = None
    # The group size is a preset's default, which quantize() may lower to one that divides every
    # layer's width (pipeline/plan.py). Not part of the recipe file: a recipe that is written down
    # (or a group size that was asked for) is used as it is.
    adapt_group_size: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("targets", "ignore"):  # a list or one string from Python, a tuple once here
            object.__setattr__(self, name, patterns(getattr(self, name), _YAML_PATHS[name]))
        check_fields(self, "", _YAML_PATHS)
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
        if self.sparsity is not None and self.self_distill is not None and \
                {"rounding", "zero_points"} & set(self.self_distill.train):
            raise InvalidConfigError("Self-distillation of a pruned model trains scales and norms only: a trained "
                                     "zero point or rounding offset would make pruned weights nonzero "
                                     "(self_distill.train: [scales, norms]).")
        validate_patterns(self.targets, "targets")
        validate_patterns(self.ignore, "ignore")

    def steps(self) -> list:
        """The configs of the steps this recipe runs, in order (pipeline/steps.py runs each):
        mixed precision, SmoothQuant, AWQ, pruning (its own step only without GPTQ: with GPTQ it
        runs inside GPTQ's pass, on the same Hessians), GPTQ where set, then rounding of what
        remains, then self-distillation of the quantized model where set."""
        mixed, smooth, awq, gptq = (getattr(self, name) for name in STEP_SECTIONS)
        prune = self.sparsity if gptq is None else None
        tail = [self.self_distill] if self.self_distill is not None else []
        return [c for c in (mixed, smooth, awq, prune, gptq) if c is not None] + [RoundingConfig()] + tail

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
            "self_distill": self.self_distill.to_dict() if self.self_distill else None,
            "sparsity": self.sparsity.to_dict() if self.sparsity else None,
            "calibration": dataclasses.asdict(self.calibration),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        if not isinstance(data, dict):
            raise InvalidConfigError("A recipe must be a mapping with 'quantize' (and optionally 'calibration'); "
                                     f"got {describe_value(data)}.")
        reject_unknown_keys(data, SECTIONS, "the recipe")
        q = data.get("quantize") or {}
        if not isinstance(q, dict):
            raise InvalidConfigError(f"quantize must be a mapping such as {{scheme: W4A16}}; got {describe_value(q)}.")
        reject_unknown_keys(q, QUANTIZE_KEYS, "quantize")
        name = q.get("scheme")
        check_value("quantize.scheme", name, str | None, PRESETS)
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
        kwargs: dict[str, Any] = {k: patterns(q[k], f"quantize.{k}") for k in ("targets", "ignore") if k in q}
        if "group_size_fallback" in q:
            check_value("quantize.group_size_fallback", q["group_size_fallback"], str, GROUP_SIZE_FALLBACKS)
            kwargs["group_size_fallback"] = q["group_size_fallback"]
        calibration = CalibrationConfig.from_dict(data["calibration"] if data.get("calibration") is not None else {})
        if "smoothquant" in data:
            sq = data["smoothquant"]
            smoothquant = SmoothQuantConfig.from_dict(sq) if sq is not None else None
        else:
            smoothquant = default_smoothquant(name, acts)
        gptq = GPTQConfig.from_dict(data["gptq"]) if data.get("gptq") is not None else None
        awq = AWQConfig.from_dict(data["awq"]) if data.get("awq") is not None else None
        mp = data.get("mixed_precision")
        mixed = MixedPrecisionConfig.from_dict(mp) if mp is not None else None
        sd = data.get("self_distill")
        self_distill = SelfDistillConfig.from_dict(sd) if sd is not None else None
        sp = data.get("sparsity")
        sparsity = SparsityConfig.from_dict(sp) if sp is not None else None
        return cls(scheme=QuantScheme(weights=weights, input_activations=acts),
                   scheme_name=name.upper() if name else None, calibration=calibration,
                   smoothquant=smoothquant, gptq=gptq, awq=awq,
                   mixed_precision=mixed, self_distill=self_distill, sparsity=sparsity, **kwargs)

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
        for optional in ("smoothquant", "gptq", "awq", "mixed_precision", "self_distill", "sparsity"):
            if changes.get(optional) is False:
                changes[optional] = None
        return dataclasses.replace(self, scheme=QuantScheme(weights=w, input_activations=a), **changes)


def _merge_args(base: QuantArgs | None, overrides: dict | None, where: str) -> QuantArgs | None:
    if overrides is None:
        return base
    check_mapping(QuantArgs, overrides, where, example="{num_bits: 4, group_size: 64}")
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
    check_value("scheme", name, str, PRESETS)
    scheme = preset(name)
    return Recipe(scheme=scheme, scheme_name=name.upper(), adapt_group_size=True,
                  smoothquant=default_smoothquant(name, scheme.input_activations)).with_overrides(**overrides)
