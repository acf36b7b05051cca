"""Prune a model's Linear layers in place, decoder layer by decoder layer (the sequential pass
GPTQ uses, quant/pipeline/sequential.py): each layer's inputs are folded into a Hessian per
Linear (layers that read the same tensor share one), then the layer is pruned and its pruned
outputs feed the next layer, so every layer is pruned against what the pruned model upstream
produces. Magnitude pruning needs no data and skips the pass.

MoE experts see the tokens routed to them; an expert routed no calibration token at all has no
Hessian and is pruned by magnitude, which its report line says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmquant.config.sparsity import SparsityConfig
from llmquant.errors import InvalidConfigError
from llmquant.prune.methods import prune_weight
from llmquant.quant.algorithms.gptq import HessianSum
from llmquant.quant.algorithms.shared_inputs import SharedInputs
from llmquant.quant.primitives import sqnr_db

NO_TOKENS_NOTE = "routed no calibration token: pruned by magnitude"
OUTSIDE_NOTE = "outside the decoder layers: pruned by magnitude"


@dataclass
class PrunedLayer:
    """What pruning did to one Linear layer, for the report."""

    name: str
    sparsity: float  # fraction of its weights that are zero
    weight_sqnr_db: float
    output_sqnr_db: float | None  # on its calibration inputs; None without data (magnitude)
    note: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_prunable(layers: dict[str, nn.Linear], cfg: SparsityConfig) -> None:
    """N:M needs every pruned layer's input width to be a multiple of M: name the ones that are not."""
    nm = cfg.n_of_m
    if nm is None:
        return
    bad = [f"{n} ({m.in_features})" for n, m in layers.items() if m.in_features % nm[1]]
    if bad:
        raise InvalidConfigError(f"{cfg.pattern} sparsity needs input widths that are multiples of {nm[1]}; "
                                 f"{len(bad)} layer(s) are not: {', '.join(bad[:5])}"
                                 f"{' ...' if len(bad) > 5 else ''}. Leave them out with ignore.")


def prune_in_place(name: str, module: nn.Linear, hessian: Tensor | None, cfg: SparsityConfig,
                   no_data_note: str = NO_TOKENS_NOTE) -> PrunedLayer:
    """Prune one Linear layer's weight (stored dtype kept) and report it; without a Hessian, a
    data-aware method falls back to magnitude and the report says why (`no_data_note`)."""
    from llmquant.quant.algorithms.gptq_handler import output_sqnr_db

    w = module.weight.detach()
    used, note = cfg, None
    if hessian is None and cfg.needs_data:
        used, note = SparsityConfig(method="magnitude", pattern=cfg.pattern, sparsity=cfg.sparsity), no_data_note
    pruned = prune_weight(w, hessian, used).weight.to(w.dtype)
    report = PrunedLayer(name=name, sparsity=float((pruned == 0).float().mean()),
                         weight_sqnr_db=sqnr_db(w.float(), pruned.float()),
                         output_sqnr_db=output_sqnr_db(w.float(), pruned.float(), hessian) if hessian is not None
                         else None, note=note)
    with torch.no_grad():
        module.weight.copy_(pruned)
    return report


def allocate(model: nn.Module, layers: dict[str, nn.Linear], cfg: SparsityConfig, batches: Tensor,
             batch_size: int) -> dict[str, float] | None:
    """Each layer's fraction under `allocation: outlier` (prune/allocation.py, one dense pass over
    the calibration windows); None when every layer gets the configured fraction."""
    if cfg.allocation != "outlier":
        return None
    from llmquant.prune.allocation import outlier_fractions

    return outlier_fractions(model, layers, cfg, batches, batch_size=batch_size)


class PruneHandler:
    """The `LayerHandler` of `run_sequential` that prunes (see the module docstring)."""

    def __init__(self, layers: dict[str, nn.Linear], cfg: SparsityConfig, fractions: dict[str, float] | None = None):
        self.layers, self.cfg = layers, cfg
        self.fractions = fractions  # Linear name -> its own fraction (allocation: outlier); None: cfg's
        self.reports: dict[str, PrunedLayer] = {}
        self._inputs: SharedInputs[HessianSum] = SharedInputs(HessianSum)

    def attach(self, index: int, prefix: str, layer: nn.Module) -> list:
        self._inputs = SharedInputs(HessianSum)
        return [module.register_forward_pre_hook(self._hook(name)) for name, module in self.layers.items()
                if name.startswith(prefix + ".")]

    def _hook(self, name: str):
        def observe(module: nn.Module, args: tuple) -> None:
            entry = self._inputs.observe(name, args[0])
            if entry is not None:
                entry.add(args[0])

        return observe

    def finish(self, index: int, prefix: str, layer: nn.Module) -> None:
        for name, module in self.layers.items():
            if name.startswith(prefix + "."):
                entry = self._inputs.entries.get(name)
                hessian = entry.h if entry is not None and entry.n > 0 else None
                cfg = self.cfg.for_layer(self.fractions, name)
                self.reports[name] = prune_in_place(name, module, hessian, cfg)
        self._inputs = SharedInputs(HessianSum)


def prune_model(model: nn.Module, layers: dict[str, nn.Linear], cfg: SparsityConfig, batches: Tensor | None, *,
                batch_size: int = 4, progress: bool = True) -> dict[str, PrunedLayer]:
    """Prune `layers` (name -> Linear, inside `model`) in place; `batches` (samples, seq_len) of
    calibration token ids are needed unless the method is magnitude. Returns each layer's report."""
    from llmquant.quant.pipeline.sequential import run_sequential

    check_prunable(layers, cfg)
    if not cfg.needs_data:
        return {name: prune_in_place(name, m, None, cfg) for name, m in layers.items()}
    fractions = allocate(model, layers, cfg, batches, batch_size)
    handler = PruneHandler(layers, cfg, fractions)
    run_sequential(model, batches, handler, batch_size=batch_size, progress=progress, desc="pruning layer by layer")
    outside = [n for n in layers if n not in handler.reports]  # not inside a decoder layer (none by default)
    for name in outside:
        handler.reports[name] = prune_in_place(name, layers[name], None, cfg.for_layer(fractions, name), OUTSIDE_NOTE)
    return handler.reports
