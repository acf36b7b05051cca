"""Per-layer sparsity under one global budget, from each decoder layer's share of outliers
(`allocation: outlier`; after Yin et al., "Outlier Weighed Layerwise Sparsity", OWL, 2023).

Pruning every layer to the same fraction treats them as equally robust; they are not. The
layers whose Wanda scores |W_ij| * ||X_j|| hold many outliers (scores above OUTLIER_FACTOR times
the layer's mean) carry features the model cannot lose, and pruning them hurts most. So:

1. one pass over the *dense* model on the calibration windows, decoder layer by decoder layer
   (the layer-by-layer machinery of quantization: one layer's activations at a time), measures
   each decoder layer's outlier share D_l over all its pruned Linear layers;
2. the shares are spread linearly over [0, 2 * allocation_range], the layers with more
   outliers keeping more weights, and shifted so that the parameter-weighted mean sparsity is
   exactly the target: the budget is global, the fractions per decoder layer;
3. every Linear layer of decoder layer l is then pruned to its fraction by the chosen method.

Unstructured patterns only (N:M fixes every layer's fraction).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmquant.config.sparsity import SparsityConfig

OUTLIER_FACTOR = 5.0  # a score counts as an outlier above this multiple of its decoder layer's mean (OWL's M)
MIN_SPARSITY, MAX_SPARSITY = 0.001, 0.99  # a layer's fraction stays a valid sparsity setting


def outlier_fractions(model: nn.Module, layers: dict[str, nn.Linear], cfg: SparsityConfig, batches: Tensor, *,
                      batch_size: int = 4) -> dict[str, float]:
    """Linear name -> the fraction of its weights to prune (module docstring). Layers outside the
    decoder stack keep the target fraction."""
    shares, sizes, members = _outlier_shares(model, layers, batches, batch_size)
    fractions = {name: cfg.fraction for name in layers}
    if len(shares) < 2 or max(shares.values()) == min(shares.values()):
        return fractions  # nothing to tell the layers apart: uniform
    lo, hi = min(shares.values()), max(shares.values())
    density = {k: (s - lo) / (hi - lo) * 2 * cfg.allocation_range for k, s in shares.items()}
    total = sum(sizes.values())
    shift = (1.0 - cfg.fraction) - sum(density[k] * sizes[k] for k in density) / total
    for k, names in members.items():
        fraction = min(MAX_SPARSITY, max(MIN_SPARSITY, 1.0 - (density[k] + shift)))
        for name in names:
            fractions[name] = fraction
    return fractions


def _outlier_shares(model: nn.Module, layers: dict[str, nn.Linear], batches: Tensor, batch_size: int):
    """Per decoder layer index: its outlier share, its pruned parameter count, its Linear names."""
    from llmquant.arch.layers import find_decoder_layers
    from llmquant.quant.pipeline.sequential import capture_first_inputs, run_layer

    prefix, blocks = find_decoder_layers(model)
    device = next(model.parameters()).device
    inputs = capture_first_inputs(model, blocks[0], batches, batch_size, device)
    shares: dict[int, float] = {}
    sizes: dict[int, int] = {}
    members: dict[int, list[str]] = {}
    for k, block in enumerate(blocks):
        inside = {n: m for n, m in layers.items() if n.startswith(f"{prefix}.{k}.")}
        norms: dict[str, Tensor] = {}  # Linear name -> sum over tokens of x_j^2, per input column
        handles = [m.register_forward_pre_hook(_column_norms(n, norms)) for n, m in inside.items()]
        try:
            run_layer(block, inputs, keep_outputs=k + 1 < len(blocks))
        finally:
            for h in handles:
                h.remove()
        scores = [(m.weight.detach().float().abs() * norms[n].sqrt().unsqueeze(0)).flatten()
                  for n, m in inside.items() if n in norms]  # an expert routed no token has no score
        if not scores:
            continue
        every = torch.cat(scores)
        shares[k] = float((every > OUTLIER_FACTOR * every.mean()).float().mean())
        sizes[k] = sum(m.weight.numel() for m in inside.values())
        members[k] = list(inside)
    return shares, sizes, members


def _column_norms(name: str, norms: dict[str, Tensor]):
    def observe(module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        sq = x.pow(2).sum(0)
        norms[name] = norms[name] + sq if name in norms else sq

    return observe
