"""The `sparsity:` recipe section: weight pruning, on its own (`llmquant prune`) or before
quantization in `llmquant quantize` (llmquant/prune/ runs it).

    sparsity:
      method: sparsegpt       # magnitude: |W|; wanda: |W| x the input's norm per column;
                              # sparsegpt: OBS error feedback with the calibration Hessian;
                              # admm: gradual mask + least-squares weight update (the lowest error)
      pattern: unstructured   # or N:M (2:4, 4:8): at most N weights kept in every M consecutive inputs
      sparsity: 0.5           # fraction of weights set to zero (unstructured; N:M gives 1 - N/M)
      block_size: 128         # sparsegpt: columns per mask decision and error-feedback block
      dampening: 0.01         # sparsegpt, admm: fraction of the Hessian's mean diagonal added before inverting
      iterations: 20          # admm: iterations (the mask grows over the first three quarters)
      allocation: uniform     # or outlier: per-decoder-layer fractions from each layer's share of
                              # outlier scores (OWL), averaging to `sparsity` (unstructured only)
      allocation_range: 0.08  # outlier: the fractions span sparsity +- this

Which layers: the recipe's targets / ignore, as for quantization. With GPTQ in the same recipe,
pruning runs inside GPTQ's layer-by-layer pass on the same Hessians, and GPTQ then rounds the
kept weights with the mask held fixed (the pruned weights stay exactly zero).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from llmquant.config.fields import check_fields, check_mapping, choices
from llmquant.errors import InvalidConfigError

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "admm")
ALLOCATIONS = ("uniform", "outlier")
UNSTRUCTURED = "unstructured"
_N_OF_M = re.compile(r"^(\d+):(\d+)$")
DEFAULT_SPARSITY = 0.5


@dataclass(frozen=True)
class SparsityConfig:
    method: str = field(default="sparsegpt", metadata=choices(PRUNE_METHODS))
    pattern: str = UNSTRUCTURED
    sparsity: float = DEFAULT_SPARSITY
    block_size: int = 128
    dampening: float = 0.01
    iterations: int = 20
    allocation: str = field(default="uniform", metadata=choices(ALLOCATIONS))
    allocation_range: float = 0.08

    def __post_init__(self) -> None:
        check_fields(self, "sparsity")
        if self.method not in PRUNE_METHODS:
            raise InvalidConfigError(f"sparsity.method must be one of {', '.join(PRUNE_METHODS)}; "
                                     f"got {self.method!r}.")
        if self.pattern != UNSTRUCTURED:
            n_m = _N_OF_M.match(self.pattern)
            if n_m is None or not 0 < int(n_m[1]) < int(n_m[2]) or int(n_m[2]) > 64:
                raise InvalidConfigError(f"sparsity.pattern must be 'unstructured' or N:M with 0 < N < M <= 64 "
                                         f"(e.g. 2:4, 4:8); got {self.pattern!r}.")
            implied = 1.0 - int(n_m[1]) / int(n_m[2])
            if self.sparsity not in (implied, DEFAULT_SPARSITY):  # the default gives way to the pattern's
                raise InvalidConfigError(f"sparsity.pattern {self.pattern} prunes {implied:.0%} of the weights; "
                                         f"sparsity {self.sparsity!r} contradicts it (leave it out).")
            object.__setattr__(self, "sparsity", implied)
        elif not 0.0 < self.sparsity < 1.0:
            raise InvalidConfigError(f"sparsity.sparsity must be a fraction between 0 and 1 (exclusive); "
                                     f"got {self.sparsity!r}.")
        if self.block_size < 1:
            raise InvalidConfigError(f"sparsity.block_size must be a positive integer, got {self.block_size!r}.")
        if self.allocation not in ALLOCATIONS:
            raise InvalidConfigError(f"sparsity.allocation must be one of {', '.join(ALLOCATIONS)}; "
                                     f"got {self.allocation!r}.")
        if self.allocation == "outlier" and (self.pattern != UNSTRUCTURED or not self.needs_data):
            raise InvalidConfigError("sparsity.allocation outlier needs an unstructured pattern (N:M fixes every "
                                     "layer's fraction) and a method that reads the calibration data (wanda, "
                                     f"sparsegpt, admm); got {self.method} {self.pattern}.")
        if not 0.0 < self.allocation_range < 0.5:
            raise InvalidConfigError(f"sparsity.allocation_range must be a fraction in (0, 0.5), "
                                     f"got {self.allocation_range!r}.")
        if self.iterations < 1:
            raise InvalidConfigError(f"sparsity.iterations must be a positive integer, got {self.iterations!r}.")
        if not 0.0 < self.dampening <= 1.0:
            raise InvalidConfigError(f"sparsity.dampening must be a number in (0, 1], got {self.dampening!r}.")

    @property
    def n_of_m(self) -> tuple[int, int] | None:
        """(N, M) for an N:M pattern, None for unstructured."""
        if self.pattern == UNSTRUCTURED:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    @property
    def fraction(self) -> float:
        """The fraction of weights pruned: `sparsity` (for N:M, set to 1 - N/M when constructed)."""
        return self.sparsity

    @property
    def needs_data(self) -> bool:
        """Magnitude pruning reads the weights only; the others need the calibration inputs."""
        return self.method != "magnitude"

    def describe(self) -> str:
        what = f"{self.pattern}" if self.n_of_m else f"{self.fraction:.0%} unstructured"
        if self.allocation == "outlier":
            what += f" on average (per decoder layer by its outliers, +-{self.allocation_range:.0%})"
        return f"{self.method} pruning, {what}"

    def to_dict(self) -> dict:
        return {"method": self.method, "pattern": self.pattern, "sparsity": self.fraction,
                "block_size": self.block_size, "dampening": self.dampening, "iterations": self.iterations,
                "allocation": self.allocation, "allocation_range": self.allocation_range}

    def for_layer(self, fractions: dict[str, float] | None, name: str) -> "SparsityConfig":
        """The setting layer `name` is pruned with: its own fraction when `fractions` (what
        `allocation: outlier` computes, prune/allocation.py) names it, else this one."""
        if fractions is None or name not in fractions:
            return self
        return dataclasses.replace(self, sparsity=fractions[name], allocation="uniform")

    @classmethod
    def from_dict(cls, data: dict) -> "SparsityConfig":
        return cls(**check_mapping(cls, data, "sparsity", example="{method: sparsegpt, pattern: '2:4'}"))
