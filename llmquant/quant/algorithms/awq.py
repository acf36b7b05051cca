"""AWQ-style activation-aware scaling for weight-only INT4 (Lin et al., 2023).

A few input channels see much larger activations than the rest; their weight columns matter
most to the output, yet a per-group scale rounds them as coarsely as any other. Multiplying
those columns by s > 1 before quantizing (and dividing the activation by s, folded into the
preceding RMSNorm or up_proj exactly as SmoothQuant folds its scales) gives them finer steps
relative to their size. With s_j = mean|x_j|^alpha (normalized so that the scales' geometric
mean of max and min is 1), alpha is searched per mapping on a grid from 0 (no scaling, so the
result is never worse on the sample) to 1, minimizing the balance layers' output error once
their weights are rounded: || x W^T - (x / s) Q(W s)^T ||^2 on sampled calibration rows.

`awq_scales` and `scaled_output_error` are pure; `awq_model` feeds them through hooks and folds
the result with smoothquant's `apply_smoothing` (which checks the folding on a probe input).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmquant.config.args import QuantArgs
from llmquant.quant.observers import weight_qparams
from llmquant.quant.pipeline.calibration import OBSERVE_BATCH
from llmquant.quant.primitives import fake_quantize, grouped_view
from llmquant.quant.algorithms.smoothquant import NEVER_RAN, Mapping, SmoothingResult, feed_calibration, fold, usable_mappings

SAMPLE_ROWS = 512
MIN_VALUE = 1e-4


def awq_scales(act_mean: Tensor, alpha: float) -> Tensor:
    """Per input channel s = mean|x|^alpha, normalized by sqrt(max(s) * min(s))."""
    s = act_mean.float().clamp(min=MIN_VALUE).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def scaled_output_error(x: Tensor, weights: list[Tensor], scales: Tensor, args: QuantArgs) -> float:
    """Relative squared output error of the balance layers with columns scaled by `scales` and
    rounded with `args` (plain rounding, minmax: the search compares scalings, not observers)."""
    args = dataclasses.replace(args, observer="minmax")
    xf, s = x.float(), scales.float()
    err = ref_norm = 0.0
    for w in weights:
        ws = w.float() * s[None, :]
        scale, zp = weight_qparams(ws, args)
        wq = fake_quantize(grouped_view(ws, args), scale, zp, args).reshape(ws.shape)
        ref = xf @ w.float().t()
        err += float((ref - (xf / s) @ wq.t()).pow(2).sum())
        ref_norm += float(ref.pow(2).sum())
    return err / max(ref_norm, 1e-30)


def search_awq_alpha(x: Tensor, weights: list[Tensor], act_mean: Tensor, args: QuantArgs,
                     grid: int = 20) -> tuple[float, float, float]:
    """(best alpha, its error, the error without scaling) over alpha = 0, 1/grid, ..., 1."""
    errors = {i / grid: scaled_output_error(x, weights, awq_scales(act_mean, i / grid), args)
              for i in range(grid + 1)}
    best = min(errors, key=errors.get)
    return best, errors[best], errors[0.0]


def _collect(model: nn.Module, mappings: list[Mapping], batches: Tensor, batch_size: int, progress: bool, feed=None
             ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """mean |x| per input channel of each mapping's shared input, and up to SAMPLE_ROWS rows of it."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    samples: dict[str, list[Tensor]] = {m.smooth: [] for m in mappings}
    per_batch = max(1, SAMPLE_ROWS // max(1, -(-batches.shape[0] // batch_size)))
    hooks = []
    for mp in mappings:
        def observe(module, args, key=mp.smooth):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[key] = x.abs().sum(0).cpu() + (sums[key] if key in sums else 0.0)
            counts[key] = counts.get(key, 0) + x.shape[0]
            rows = torch.linspace(0, x.shape[0] - 1, min(per_batch, x.shape[0])).long()
            samples[key].append(x[rows].cpu())
        hooks.append(model.get_submodule(mp.observed).register_forward_pre_hook(observe))
    if feed is not None:
        feed(hooks)
    else:
        feed_calibration(model, batches, hooks, batch_size=batch_size, desc="AWQ statistics", progress=progress)
    means = {k: sums[k] / counts[k] for k in sums}
    return means, {k: torch.cat(v)[:SAMPLE_ROWS] for k, v in samples.items() if v}


def awq_model(model: nn.Module, batches: Tensor, args: QuantArgs, *, grid: int = 20, only: set[str] | None = None,
              batch_size: int = OBSERVE_BATCH, progress: bool = True, within: list[Mapping] | None = None, probe=None,
              feed=None) -> SmoothingResult:
    """Search and fold AWQ scales for every mapping whose balance layers are all in `only`
    (`within`, `probe`, `feed`: one decoder layer at a time, as smoothquant.smooth_model takes them)."""
    result = SmoothingResult(alpha="awq")
    mappings = usable_mappings(model, batches, only, result, within, probe)
    means, samples = _collect(model, mappings, batches, batch_size, progress, feed)
    for mp in tqdm(mappings, desc="AWQ scale search", unit="mapping", disable=not progress, leave=False):
        if mp.smooth not in means:
            result.skipped[mp.smooth] = NEVER_RAN
            continue
        balance = [model.get_submodule(b).weight.detach() for b in mp.balance]
        alpha, _, _ = search_awq_alpha(samples[mp.smooth], balance, means[mp.smooth], args, grid)
        if alpha == 0.0:
            result.applied[mp.smooth] = 0.0  # no scaling helps this mapping; nothing to fold
            continue
        fold(model, mp, awq_scales(means[mp.smooth], alpha), alpha, result)
    return result
