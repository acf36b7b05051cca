"""GPTQ over a whole model: hooks that feed `gptq.py`'s pure functions, one decoder layer at a time.

While a decoder layer runs on the calibration batches, a pre-hook on each of its planned
Linear layers folds the layer's input into a running Hessian (and, for activation schemes,
into the activation statistics the report and static scales need). Layers that read the very
same input tensor (q/k/v after one norm, gate/up after another) share one Hessian, and when
they also share a scheme their weights are stacked and quantized in one GPTQ call: rows are
independent in GPTQ, so this is the same result, computed once. Targeted layers outside the
decoder stack (none by default) are rounded plainly, as without GPTQ.

MoE experts are Linear layers like any other (llmquant/arch/experts.py): each expert's Hessian
comes from the tokens routed to it; experts routed too few calibration tokens get a second pass
in which they see every token (`refill`, expert_calibration.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmquant.config.args import QuantScheme
from llmquant.quant.pipeline.calibration import ActivationStats, new_activation_stats
from llmquant.quant.pipeline.expert_calibration import ExpertCalibration
from llmquant.quant.algorithms.gptq import HessianSum, gptq_quantize_weight
from llmquant.quant.algorithms.shared_inputs import SharedInputs
from llmquant.quant.linear import QuantizedLinear
from llmquant.quant.pipeline.plan import LayerPlan
from llmquant.quant.primitives import sqnr_db
from llmquant.config.recipe import GPTQConfig
from llmquant.config.sparsity import SparsityConfig
from llmquant.prune.methods import prune_weight
from llmquant.quant.pipeline.report import LayerReport
from llmquant.quant.pipeline.targets import set_submodule


def scale_dtype_for(scheme: QuantScheme, storage_dtype: torch.dtype) -> torch.dtype:
    # Weight-only INT scales are read by vLLM in the activation dtype, so they are stored in the
    # model's dtype (and quantized with the rounded value); FP8/INT8-activation scales are float32.
    return storage_dtype if scheme.format == "pack-quantized" else torch.float32


class GPTQHandler:
    """The `LayerHandler` of `run_sequential` for GPTQ (see the module docstring)."""

    def __init__(self, model: nn.Module, plans: list[LayerPlan], config: GPTQConfig, storage_dtype: torch.dtype,
                 *, moe_calibration: str = "routed", min_expert_tokens: int = 1, total_tokens: int = 0,
                 sparsity: SparsityConfig | None = None, fractions: dict[str, float] | None = None):
        self.model, self.config, self.storage_dtype = model, config, storage_dtype
        self.sparsity = sparsity  # prune each weight on its Hessian first, then round with the mask fixed
        self.fractions = fractions  # Linear name -> its own pruned fraction (allocation: outlier)
        self.plans = {p.name: p for p in plans if p.scheme is not None}
        self.reports: dict[str, LayerReport] = {}
        self.stats: dict[str, ActivationStats] = {}
        self.moe = (moe_calibration, min_expert_tokens, total_tokens)
        self._experts: ExpertCalibration | None = None  # this decoder layer's MoE experts
        self._inputs: SharedInputs[HessianSum] = SharedInputs(HessianSum)  # this decoder layer's Hessians
        self._only: set[str] | None = None  # during a refill pass: the layers that accumulate

    # ---- observation -------------------------------------------------------------------------
    def attach(self, index: int, prefix: str, layer: nn.Module) -> list:
        handles = []
        self._inputs, self._only = SharedInputs(HessianSum), None
        self._experts = ExpertCalibration(layer, prefix + ".", *self.moe)
        for name, plan in self.plans.items():
            if not name.startswith(prefix + "."):
                continue
            self._new_stats(name)
            module = layer.get_submodule(name[len(prefix) + 1:])
            handles.append(module.register_forward_pre_hook(self._hook(name)))
        return handles

    def hessians(self) -> dict[str, Tensor]:
        """This decoder layer's Hessians so far, by Linear name (shared ones appear under each name)."""
        return {name: entry.h for name, entry in self._inputs.entries.items() if entry.h is not None}

    def _new_stats(self, name: str) -> None:
        act = self.plans[name].scheme.input_activations
        if act is not None:
            self.stats[name] = new_activation_stats(act)

    def refill(self, index: int, prefix: str, layer: nn.Module) -> bool:
        """After the routed pass: True when some experts saw too few tokens, whose statistics are
        then reset and collected again, from every token, in one more pass (run_sequential)."""
        again = {n for n in self._experts.fallback() if n in self.plans}
        for name in again:
            self._inputs.forget(name)
            self._new_stats(name)
        self._only = again
        return bool(again)

    def _hook(self, name: str):
        def observe(module: nn.Module, args: tuple) -> None:
            if self._only is not None and name not in self._only:
                return
            x = args[0]
            hessian = self._inputs.observe(name, x)
            if hessian is not None:
                hessian.add(x)
            if name in self.stats:
                self.stats[name].update(x)

        return observe

    # ---- quantization ------------------------------------------------------------------------
    def finish(self, index: int, prefix: str, layer: nn.Module) -> None:
        self._experts.finish()
        groups: dict[tuple[str, QuantScheme], list[str]] = {}
        for name, owner in self._inputs.owners.items():
            groups.setdefault((owner, self.plans[name].scheme), []).append(name)
        for (owner, scheme), names in groups.items():
            self._quantize_group(names, self._inputs.entries[owner].h, scheme)
        self._inputs = SharedInputs(HessianSum)

    def _quantize_group(self, names: list[str], hessian: Tensor, scheme: QuantScheme) -> None:
        modules = [self.plans[n].module for n in names]
        weight = torch.cat([m.weight.detach() for m in modules], dim=0)  # (sum of out, in)
        scale_dtype = scale_dtype_for(scheme, self.storage_dtype)
        cfg = self.config
        keep = None
        if self.sparsity is not None:
            # Each layer pruned on its own (its fraction, its threshold), on the Hessian they share.
            pruned = [prune_weight(m.weight.detach(), hessian, self.sparsity.for_layer(self.fractions, n))
                      for n, m in zip(names, modules)]
            weight, keep = torch.cat([p.weight for p in pruned]), torch.cat([p.keep for p in pruned])
        result = gptq_quantize_weight(weight, hessian, scheme.weights, block_size=cfg.block_size,
                                      dampening=cfg.dampening, act_order=cfg.act_order, scale_dtype=scale_dtype,
                                      weighted_clipping=cfg.weighted_clipping, refit_rounds=cfg.refit_rounds,
                                      keep=keep)
        row = 0
        for name, module in zip(names, modules):
            rows = slice(row, row + module.out_features)
            row += module.out_features
            per_tensor = scheme.weights.strategy == "tensor"
            scale = result.scale if per_tensor else result.scale[rows]
            zp = None if result.zero_point is None else (result.zero_point if per_tensor else result.zero_point[rows])
            self._install(name, module, scheme, result.q[rows], scale, zp, result.dequantized[rows], hessian,
                          scale_dtype)

    def _install(self, name: str, module: nn.Linear, scheme: QuantScheme, q: Tensor, scale: Tensor,
                 zero_point: Tensor | None, dequantized: Tensor, hessian: Tensor, scale_dtype: torch.dtype) -> None:
        w = module.weight.detach()
        qlayer = QuantizedLinear(module.in_features, module.out_features, scheme, bias=module.bias is not None,
                                 scale_dtype=scale_dtype, dtype=w.dtype, device=w.device)
        qlayer.set_quantized(q, scale, zero_point)
        if module.bias is not None:
            qlayer.bias.data.copy_(module.bias.detach())
        stat = self.stats.get(name)
        if scheme.has_static_activations:
            qlayer.input_scale.fill_(stat.scale())
        plan = self.plans[name]
        entry = LayerReport(name=name, out_features=module.out_features, in_features=module.in_features,
                            scheme=scheme.describe() + " (GPTQ)", weight_sqnr_db=sqnr_db(w, dequantized),
                            note=plan.note)
        if self._experts is not None:
            self._experts.annotate(entry)
        entry.output_sqnr_db = output_sqnr_db(w.float(), dequantized, hessian)
        entry.add_activation_stats(stat, scheme.has_static_activations)
        self.reports[name] = entry
        set_submodule(self.model, name, qlayer)
        plan.module = None  # the float layer is no longer referenced by the model


def output_sqnr_db(weight: Tensor, approx: Tensor, hessian: Tensor) -> float:
    """SQNR of the layer's outputs on the calibration inputs: tr(W H W^T) / tr(dW H dW^T).

    The products run in float32 (a report figure, good to far below 0.01 dB; float64 products
    were a tenth of GPTQ's own time on the demo model), the sums in float64."""
    import math

    w, h = weight.float(), hessian.float()
    d = w - approx.float()
    noise = float((d @ h * d).sum(dtype=torch.float64))
    signal = float((w @ h * w).sum(dtype=torch.float64))
    if noise <= 0:
        return float("inf")
    return 10.0 * math.log10(signal / noise) if signal > 0 else float("-inf")
