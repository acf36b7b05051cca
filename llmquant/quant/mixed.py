"""Automatic mixed precision: spend extra bits where they buy the most.

Each targeted layer's sensitivity is the mean KL divergence of the model's output (against the
unquantized model, on calibration windows) when only that layer is rounded to the low scheme
(e.g. W4A16). Layers then move to the high scheme (W8A16) in the order of sensitivity per added
bit, until the average bits per weight reaches `target_bits`, or until the estimated damage
of the layers still low (the sum of their KLs, whose exp - 1 approximates the relative
perplexity increase) is within `max_ppl_increase`. Sensitivities are measured on calibration
text, never on the held-out split used to evaluate.

The result is a plan per layer; the checkpoint stores one config group per scheme, each
targeting its layers by name, which vLLM and transformers read as any compressed-tensors file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmquant.quant.args import QuantScheme
from llmquant.quant.observers import weight_qparams
from llmquant.quant.plan import LayerPlan
from llmquant.quant.primitives import fake_quantize, grouped_view
from llmquant.quant.verify import compare_to_reference, reference_logprobs

SCALE_BITS = 16  # weight-only scales are stored in the model's 16-bit dtype


def bits_per_weight(scheme: QuantScheme | None, in_features: int) -> float:
    """Stored bits per weight, scales and zero points included; 16 for a layer kept as is."""
    if scheme is None:
        return 16.0
    w = scheme.weights
    per = w.group_size if w.strategy == "group" else in_features
    extra = SCALE_BITS / per + (w.num_bits / per if not w.symmetric else 0.0)
    return w.num_bits + extra


@dataclass
class Choice:
    schemes: dict[str, QuantScheme]  # layer -> chosen scheme
    sensitivity: dict[str, float]  # layer -> KL with only that layer at the low scheme
    average_bits: float
    estimated_ppl_increase_pct: float  # exp(sum of the KLs of layers left low) - 1

    def describe(self) -> str:
        high = sum(1 for s in self.schemes.values() if s is not None) - self.low_count
        return (f"mixed precision: {self.low_count} layers low, {high} high; {self.average_bits:.2f} bits per weight; "
                f"estimated perplexity increase {self.estimated_ppl_increase_pct:+.1f}%")

    low_count: int = 0


def layer_sensitivities(model: nn.Module, plans: list[LayerPlan], low: QuantScheme, windows: Tensor,
                        progress: bool = True) -> dict[str, float]:
    """Mean KL of the model's output when only one layer is rounded to `low`, for every plan."""
    reference = reference_logprobs(model, windows, progress=False)
    out: dict[str, float] = {}
    for plan in tqdm([p for p in plans if p.scheme is not None], desc="layer sensitivity", unit="layer",
                     disable=not progress):
        weight = plan.module.weight
        saved = weight.data.clone()
        args = low.weights
        scale, zp = weight_qparams(weight.detach(), args)
        weight.data = fake_quantize(grouped_view(weight.detach().float(), args), scale, zp,
                                    args).reshape(weight.shape).to(weight.dtype)
        try:
            out[plan.name] = compare_to_reference(model, windows, reference, progress=False).kl_mean
        finally:
            weight.data = saved
    return out


def choose_schemes(plans: list[LayerPlan], sensitivity: dict[str, float], low: QuantScheme, high: QuantScheme, *,
                   target_bits: float | None = None, max_ppl_increase: float | None = None) -> Choice:
    """Greedy upgrades from `low` to `high` by sensitivity per added bit (see the module docstring)."""
    layers = [p for p in plans if p.scheme is not None]
    params = {p.name: p.module.weight.numel() for p in layers}
    bits = {p.name: (bits_per_weight(low, p.module.in_features), bits_per_weight(high, p.module.in_features))
            for p in layers}
    total = sum(params.values())
    chosen = {p.name: low for p in layers}
    used = sum(bits[n][0] * params[n] for n in chosen)
    damage = sum(sensitivity.values())
    budget_kl = math.log1p(max_ppl_increase / 100.0) if max_ppl_increase is not None else None
    order = sorted(chosen, key=lambda n: sensitivity[n] / ((bits[n][1] - bits[n][0]) * params[n]), reverse=True)
    for name in order:
        if budget_kl is not None and damage <= budget_kl:
            break
        extra = (bits[name][1] - bits[name][0]) * params[name]
        if target_bits is not None and (used + extra) / total > target_bits:
            continue  # too big for what is left; a smaller layer may still fit
        chosen[name] = high
        used += extra
        damage -= sensitivity[name]
    low_count = sum(1 for s in chosen.values() if s == low)
    return Choice(schemes=chosen, sensitivity=sensitivity, average_bits=used / total,
                  estimated_ppl_increase_pct=100.0 * math.expm1(max(damage, 0.0)), low_count=low_count)
