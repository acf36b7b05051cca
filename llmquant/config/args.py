"""What a quantization scheme is: small frozen dataclasses, validated on construction.

Field names follow the compressed-tensors `QuantizationArgs`, so a scheme serializes into a
checkpoint's `quantization_config` (and back) without translation tables.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

# reject_unknown_keys is re-exported: the distill and eval-suite config readers import it from here.
from llmquant.config.fields import check_fields, check_mapping, choices, reject_unknown_keys  # noqa: F401
from llmquant.errors import InvalidConfigError

INT, FLOAT = "int", "float"
TYPES = (INT, FLOAT)
STRATEGIES = ("tensor", "channel", "group", "token")
WEIGHT_OBSERVERS = ("minmax", "percentile", "mse")
ACTIVATION_OBSERVERS = ("minmax", "percentile")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0


@dataclass(frozen=True)
class QuantArgs:
    """How one tensor (weights or input activations) is quantized."""

    num_bits: int = field(default=8, metadata=choices((4, 8)))
    type: str = field(default=INT, metadata=choices(TYPES))
    symmetric: bool = True
    strategy: str = field(default="channel", metadata=choices(STRATEGIES))
    group_size: int | None = None
    dynamic: bool = False
    observer: str = field(default="minmax", metadata=choices(WEIGHT_OBSERVERS))
    percentile: float = 99.99  # only read by observer="percentile"

    def __post_init__(self) -> None:
        check_fields(self, "QuantArgs")  # types first: the checks below compare values

        def bad(msg: str) -> InvalidConfigError:
            return InvalidConfigError(f"Invalid quantization arguments {self.describe()}: {msg}")

        if self.type not in TYPES:
            raise bad(f"type must be one of {TYPES}, got {self.type!r}")
        if self.strategy not in STRATEGIES:
            raise bad(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.type == INT and self.num_bits not in (4, 8):
            raise bad(f"integer quantization supports 4 or 8 bits, got {self.num_bits}")
        if self.type == FLOAT and (self.num_bits != 8 or not self.symmetric):
            raise bad("float quantization is FP8 E4M3: num_bits 8, symmetric")
        if self.strategy == "group":
            if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 8:
                raise bad(f"group strategy needs a positive group_size that is a multiple of 8 "
                          f"(typically 32, 64 or 128), got {self.group_size!r}")
        elif self.group_size is not None:
            raise bad(f"group_size is only valid with strategy 'group' (strategy is {self.strategy!r})")
        if self.observer not in WEIGHT_OBSERVERS:
            raise bad(f"observer must be one of {WEIGHT_OBSERVERS}, got {self.observer!r}")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise bad(f"percentile must be in (50, 100], got {self.percentile}")

    # ---- integer/float ranges -------------------------------------------------------------
    @property
    def qmin(self) -> float:
        return -FP8_MAX if self.type == FLOAT else -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> float:
        return FP8_MAX if self.type == FLOAT else 2 ** (self.num_bits - 1) - 1

    def describe(self) -> str:
        kind = "fp8" if self.type == FLOAT else f"int{self.num_bits}"
        gran = f"group{self.group_size}" if self.strategy == "group" else self.strategy
        sym = "" if self.symmetric else " asym"
        dyn = " dynamic" if self.dynamic else ""
        obs = self.observer + (f"{self.percentile:g}" if self.observer == "percentile" else "")
        return f"{kind} {gran}{sym}{dyn} ({obs})"

    # ---- (de)serialization ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "quantization arguments") -> "QuantArgs":
        return cls(**check_mapping(cls, data, where, example="{num_bits: 4, strategy: group, group_size: 128}"))

    def to_compressed_tensors(self) -> dict[str, Any]:
        """The `QuantizationArgs` dict vLLM and compressed-tensors read."""
        out: dict[str, Any] = {
            "num_bits": self.num_bits, "type": self.type, "symmetric": self.symmetric,
            "group_size": self.group_size, "strategy": self.strategy, "dynamic": self.dynamic,
            "actorder": None, "block_structure": None, "observer": self.observer,
        }
        if self.observer == "percentile":
            out["observer_kwargs"] = {"percentile": self.percentile}
        return out

    @classmethod
    def from_compressed_tensors(cls, data: dict[str, Any]) -> "QuantArgs":
        """Read a checkpoint's args; fields we cannot execute are refused by the caller."""
        dynamic = data.get("dynamic", False)
        observer = data.get("observer") or "minmax"
        kwargs = data.get("observer_kwargs") or {}
        return cls(
            num_bits=int(data.get("num_bits", 8)), type=str(data.get("type", INT)),
            symmetric=bool(data.get("symmetric", True)), strategy=str(data.get("strategy") or "tensor"),
            group_size=data.get("group_size"), dynamic=dynamic is True or dynamic == "true",
            # Observers only matter while quantizing; foreign names (e.g. "static_minmax")
            # are kept out of our validated set.
            observer=observer if observer in WEIGHT_OBSERVERS else "minmax",
            percentile=float(kwargs.get("percentile", 99.99)),
        )


@dataclass(frozen=True)
class QuantScheme:
    """Weights, and optionally the input activations, of one group of Linear layers."""

    weights: QuantArgs
    input_activations: QuantArgs | None = None

    def __post_init__(self) -> None:
        w, a = self.weights, self.input_activations
        if w.strategy == "token" or w.dynamic:
            raise InvalidConfigError("Weights are quantized statically per tensor, channel or group, "
                                     "not per token or dynamically.")
        if a is None:
            return
        if a.type != w.type:
            raise InvalidConfigError(
                "Weights and activations must both be integer (W8A8) or both FP8 (FP8, FP8_DYNAMIC); "
                f"got {w.type} weights with {a.type} activations.")
        if a.type == INT and (a.num_bits != 8 or w.num_bits != 8):
            raise InvalidConfigError("Integer activation quantization is W8A8: 8-bit weights and activations.")
        if not a.symmetric:
            raise InvalidConfigError("Activation quantization is symmetric in llmquant; set symmetric: true.")
        if a.dynamic and a.strategy != "token":
            raise InvalidConfigError("Dynamic activation quantization is per token (strategy: token).")
        if not a.dynamic and a.strategy != "tensor":
            raise InvalidConfigError("Static activation quantization is per tensor (strategy: tensor).")
        if a.dynamic and a.observer != "minmax":
            raise InvalidConfigError(
                "Dynamic activations take their scale from each token's own max at run time, so they "
                f"cannot use the {a.observer!r} observer; use static activations to clip outliers.")
        if a.observer not in ACTIVATION_OBSERVERS:
            raise InvalidConfigError(f"Activation observers: {', '.join(ACTIVATION_OBSERVERS)}; got {a.observer!r}.")

    @property
    def format(self) -> str:
        """The compressed-tensors storage format of the weights."""
        if self.weights.type == FLOAT:
            return "float-quantized"
        return "int-quantized" if self.input_activations is not None else "pack-quantized"

    @property
    def has_static_activations(self) -> bool:
        return self.input_activations is not None and not self.input_activations.dynamic

    def describe(self) -> str:
        act = f", act {self.input_activations.describe()}" if self.input_activations else ""
        return f"w {self.weights.describe()}{act}"

    def replace(self, **changes) -> "QuantScheme":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.to_dict(),
                "input_activations": self.input_activations.to_dict() if self.input_activations else None}

    def to_compressed_tensors(self, targets: list[str]) -> dict[str, Any]:
        return {
            "targets": list(targets),
            "weights": self.weights.to_compressed_tensors(),
            "input_activations": (self.input_activations.to_compressed_tensors()
                                  if self.input_activations else None),
            "output_activations": None,
            "format": self.format,
        }

