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

from llmquant.config.args import QuantScheme
from llmquant.quant.observers import weight_qparams
from llmquant.quant.pipeline.plan import LayerPlan
from llmquant.quant.primitives import fake_quantize, grouped_view
from llmquant.quant.pipeline.verify import compare_to_reference, reference_logprobs

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
                        progress: bool = True, reuse_layer_inputs: bool = True) -> dict[str, float]:
    """Mean KL of the model's output when only one layer is rounded to `low`, for every plan.

    The hidden states entering each decoder layer are computed once; a layer inside decoder
    layer k then only needs layers k.. and the head re-run (about half the work of a full
    forward on average). Models without a recognizable stack and head take full forwards."""
    reference = reference_logprobs(model, windows, progress=False)
    tail = _TailRunner.build(model, windows) if reuse_layer_inputs else None
    out: dict[str, float] = {}
    for plan in tqdm([p for p in plans if p.scheme is not None], desc="layer sensitivity", unit="layer",
                     disable=not progress):
        weight = plan.module.weight
        saved = weight.data.clone()
        round_in_place(weight, low)
        try:
            start = tail.layer_of(plan.name) if tail is not None else None
            if start is None:
                out[plan.name] = compare_to_reference(model, windows, reference, progress=False).kl_mean
            else:
                out[plan.name] = mean_kl(tail.logits_from(start), reference)
        finally:
            weight.data = saved
    return out


def round_in_place(weight: Tensor, low: QuantScheme) -> None:
    """The weight rounded to `low` (fake-quantized, same dtype): what its sensitivity measures."""
    args = low.weights
    scale, zp = weight_qparams(weight.detach(), args)
    weight.data = fake_quantize(grouped_view(weight.detach().float(), args), scale, zp,
                                args).reshape(weight.shape).to(weight.dtype)


def final_norm_and_head(model: nn.Module, prefix: str) -> tuple[nn.Module | None, nn.Module | None]:
    """The final norm (beside the decoder stack) and the output head, as the tail runs them."""
    parent = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    return getattr(parent, "norm", None), model.get_output_embeddings()


def mean_kl(logits: Tensor, reference: list[tuple[Tensor, Tensor]]) -> float:
    kls = []
    for row, (ref, _) in zip(logits, reference):
        logq = torch.log_softmax(row.float().cpu(), dim=-1)
        logp = torch.log_softmax(ref.float(), dim=-1)
        kls.append((logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0))
    return float(torch.cat(kls).mean())


class _TailRunner:
    """Runs a causal LM from decoder layer k on cached inputs: layers k.., final norm, head."""

    def __init__(self, prefix: str, layers: nn.ModuleList, norm: nn.Module, head: nn.Module, cached: list):
        self.prefix, self.layers, self.norm, self.head, self.cached = prefix, layers, norm, head, cached

    @classmethod
    def build(cls, model: nn.Module, windows: Tensor) -> "_TailRunner | None":
        from llmquant.arch.layers import find_decoder_layers
        from llmquant.quant.pipeline.sequential import capture_first_inputs

        try:
            prefix, layers = find_decoder_layers(model)
        except Exception:
            return None
        norm, head = final_norm_and_head(model, prefix)
        if norm is None or head is None:
            return None
        device = next(model.parameters()).device
        first = capture_first_inputs(model, layers[0], windows, windows.shape[0], device).calls[0]
        cached, (args, kwargs) = [], first
        with torch.inference_mode():
            for layer in layers:
                cached.append((args, kwargs))
                out = layer(*args, **kwargs)
                args = ((out[0] if isinstance(out, (tuple, list)) else out),) + tuple(args[1:])
        return cls(prefix, layers, norm, head, cached)

    def layer_of(self, name: str) -> int | None:
        from llmquant.arch.layers import layer_index

        return layer_index(name, self.prefix)

    def logits_from(self, k: int) -> Tensor:
        args, kwargs = self.cached[k]
        with torch.inference_mode():
            for layer in self.layers[k:]:
                out = layer(*args, **kwargs)
                args = ((out[0] if isinstance(out, (tuple, list)) else out),) + tuple(args[1:])
            return self.head(self.norm(args[0]))


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
