"""Algorithms as registered steps: a recipe's step configs (`Recipe.steps()`, in order) are
dispatched by their type to one handler each, `handler(config, ctx)`.

A new algorithm is a config dataclass in the recipe, a handler that reads and adds to the
`StepContext`, and one `register_step` line; `quantize()` does not change.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from llmquant.config.recipe import AWQConfig, GPTQConfig, MixedPrecisionConfig, Recipe, RoundingConfig, SmoothQuantConfig
from llmquant.config.self_distill import SelfDistillConfig
from llmquant.config.sparsity import SparsityConfig
from llmquant.errors import InvalidConfigError
from llmquant.quant.pipeline.context import StepContext
from llmquant.quant.pipeline.step_gptq import gptq_step
from llmquant.quant.pipeline.step_mixed import mixed_precision_step
from llmquant.quant.pipeline.step_prune import prune_step
from llmquant.quant.pipeline.step_rounding import rounding_step
from llmquant.quant.pipeline.step_self_distill import self_distill_step
from llmquant.quant.pipeline.step_smoothing import awq_step, smoothquant_step

StepHandler = Callable[[Any, StepContext], None]

# config type -> (name used in timings and reports, handler)
_STEPS: dict[type, tuple[str, StepHandler]] = {}


def register_step(config_type: type, name: str, handler: StepHandler) -> None:
    """Run `handler(config, ctx)` for every recipe step whose config is a `config_type`."""
    _STEPS[config_type] = (name, handler)


def registered_steps() -> dict[type, str]:
    return {t: name for t, (name, _) in _STEPS.items()}


def run_steps(recipe: Recipe, ctx: StepContext) -> None:
    for config in recipe.steps():
        try:
            name, handler = _STEPS[type(config)]
        except KeyError:
            raise InvalidConfigError(f"No step handles {type(config).__name__}; registered: "
                                     f"{', '.join(t.__name__ for t in _STEPS)}.") from None
        t = time.perf_counter()
        handler(config, ctx)
        ctx.timings[name] = time.perf_counter() - t


register_step(MixedPrecisionConfig, "mixed_precision", mixed_precision_step)
register_step(SmoothQuantConfig, "smoothquant", smoothquant_step)
register_step(AWQConfig, "awq", awq_step)
register_step(SparsityConfig, "sparsity", prune_step)
register_step(GPTQConfig, "gptq", gptq_step)
register_step(RoundingConfig, "rounding", rounding_step)
register_step(SelfDistillConfig, "self_distill", self_distill_step)
