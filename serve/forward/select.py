"""`select_forward`: the one place that decides which forward runs a model.

In order of preference:
1. the lean forward (lean.py) on the compiled CPU kernels with the C++ decode loop
   (cpu_backend.py), on CPU where they are compiled, for a bf16 or float32 model;
2. the lean forward on PyTorch ops;
3. transformers' own forward, right for every model: what every other architecture gets, and
   what a model gets when a lean variant disagrees with it on the probe (probe.py).
The lean forward is only offered to the architectures it reproduces (`LeanForward.supports`),
and each variant must agree with transformers on the probe before it is used: the probe is the
safety net, the structural check the decision.
"""

from __future__ import annotations

import logging

from torch import nn

from llmquant.quant.linear import QuantizedLinear
from llmquant.serve.forward import cpu_backend
from llmquant.serve.forward.interface import Forward
from llmquant.serve.forward.lean import LeanForward, TorchSteps
from llmquant.serve.forward.probe import NOISE_MARGIN, PROBE_MAX_KL, noise_floor, probe_kl
from llmquant.serve.forward.transformers_forward import TransformersForward

log = logging.getLogger("llmquant.serve")


def select_forward(model: nn.Module, max_positions: int, probe: list[int], *, lean: bool = True) -> Forward:
    """The forward for `model` (see the module docstring); `probe`: probe.probe_ids(tokenizer);
    `lean=False` keeps transformers' forward (for comparisons)."""
    fallback = TransformersForward(model)
    if not lean:
        return fallback
    if not LeanForward.supports(model):
        log.info("lean forward: %s is not a Llama-shaped decoder; using the transformers forward",
                 type(model).__name__)
        return fallback
    chosen = _lean_forward(model, max(max_positions, len(probe)), probe)  # the rotary table reaches the probe
    # The probe ran transformers' forward: drop the kernel layouts it derived for the unfused
    # projections (the lean forward uses the fused ones), so they do not hold memory.
    keep = chosen.modules() if chosen is not None else []
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and not any(module is part for part in keep):
            module.kernel_cache.clear()
    if chosen is None:
        log.warning("using the transformers forward")
        return fallback
    log.info("%s", chosen.name)
    return chosen


def _lean_forward(model: nn.Module, positions: int, probe: list[int]) -> LeanForward | None:
    """The first lean variant that agrees with transformers on the probe, or None."""
    candidates = ([cpu_backend.CpuSteps] if cpu_backend.available(model) else []) + [TorchSteps]
    try:
        forward = LeanForward(model, positions)
    except Exception:  # a shape it does not handle after all: refused, like a disagreement
        log.warning("the lean forward could not be built", exc_info=True)
        return None
    allowed, floor = PROBE_MAX_KL, None
    for steps in candidates:
        try:
            forward.use_steps(steps)
            error = probe_kl(forward, model, probe)
        except Exception:  # refused, like a disagreement
            log.warning("lean forward (%s) failed on the probe", steps.name, exc_info=True)
            continue
        if error > allowed and floor is None:  # is this model this sensitive to rounding by itself?
            floor = noise_floor(model, probe)
            allowed = max(PROBE_MAX_KL, NOISE_MARGIN * floor)
            log.info("lean forward probe: KL %.3g; transformers' own noise floor %.3g, bound %.3g",
                     error, floor, allowed)
        if error <= allowed:
            return forward
        log.warning("%s disagrees with transformers on a probe (KL %.3g nats/token, bound %.3g)",
                    forward.name, error, allowed)
    return None
