"""SmoothQuant: move activation outliers into the weights before quantizing both.

A few input channels of some Linear layers carry values 10-100x larger than the rest, so a
per-token INT8 scale spends its range on them. For each such channel j, dividing the
activation by s_j and multiplying the weight column by s_j leaves the product unchanged;
the division is folded into the module that produces the activation (the RMSNorm before
q/k/v and gate/up, the up_proj before down_proj; which module feeds which, for every
architecture and for MoE experts and routers, comes from llmquant/arch/mappings.py), so the
model computes the same function.
With s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (Xiao et al., 2023), alpha is the migration
strength: 0 leaves activations alone, 1 moves all of their range into the weights. The best
alpha differs between models and between layers of one model, so `alpha="auto"` searches a
grid per mapping for the value that minimizes the balance layers' output error once weights
and activations are quantized, measured on a bounded sample of real calibration inputs.

The math is in `smoothing_scales` (pure); `collect_channel_absmax` feeds it from calibration
text through hooks; `usable_mappings` keeps a norm mapping only where a real forward shows its
layers reading that norm's output; `apply_smoothing` folds the scales and checks, on a probe
input, that a norm's output really scaled by 1/s (one computing (1 + w) * x, as Gemma's does,
would not): a mapping that fails a check is reverted and reported, never applied wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmquant.arch.mappings import Mapping, check_readers, find_mappings
from llmquant.quant.pipeline.calibration import OBSERVE_BATCH, forward_for_statistics

MIN_VALUE = 1e-5
AUTO_ALPHAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SAMPLE_ROWS = 512  # calibration input rows kept per mapping for the alpha search


@dataclass
class SmoothingResult:
    alpha: float | str
    applied: dict[str, float] = field(default_factory=dict)  # smoothing module -> alpha used
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why
    touched: set[str] = field(default_factory=set)  # modules whose weights changed (smoothing + co-scaled)

    def to_dict(self) -> dict:
        return {"alpha": self.alpha, "applied": len(self.applied), "alphas": self.applied,
                "skipped": self.skipped}


def smoothing_scales(act_absmax: Tensor, weight_absmax: Tensor, alpha: float) -> Tensor:
    """Per input channel s = max|X|^alpha / max|W|^(1 - alpha); 1 where a channel never fired."""
    a = act_absmax.float().clamp(min=MIN_VALUE)
    w = weight_absmax.float().clamp(min=MIN_VALUE)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    return torch.where(act_absmax > 0, s, torch.ones_like(s)).clamp(min=MIN_VALUE)


def smoothed_output_error(x: Tensor, weights: list[Tensor], scales: Tensor, scheme) -> float:
    """Relative squared error of the balance layers' outputs when x (rows, in) is divided by
    `scales`, the weights (out, in) multiplied by them, and both quantized with `scheme`."""
    from llmquant.quant.observers import weight_qparams
    from llmquant.quant.primitives import fake_quantize, grouped_view, quantize_activation

    s = scales.float()
    xs = x.float() / s
    act = scheme.input_activations
    if act.dynamic:
        xq = quantize_activation(xs, act)
    else:
        xq = quantize_activation(xs, act, (xs.abs().max() / act.qmax).reshape(1))
    err = ref_norm = 0.0
    for w in weights:
        ws = w.float() * s[None, :]
        scale, zp = weight_qparams(ws, scheme.weights)
        wq = fake_quantize(grouped_view(ws, scheme.weights), scale, zp, scheme.weights).reshape(ws.shape)
        ref = x.float() @ w.float().t()
        err += float((ref - xq @ wq.t()).pow(2).sum())
        ref_norm += float(ref.pow(2).sum())
    return err / max(ref_norm, 1e-30)


def search_alpha(x: Tensor, weights: list[Tensor], act_absmax: Tensor, scheme,
                 alphas: tuple[float, ...] = AUTO_ALPHAS) -> float:
    """The alpha of `alphas` whose smoothing gives the smallest quantized output error."""
    weight_absmax = torch.stack([w.abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    errors = {a: smoothed_output_error(x, weights, smoothing_scales(act_absmax, weight_absmax, a), scheme)
              for a in alphas}
    return min(errors, key=errors.get)


def collect_channel_absmax(model: nn.Module, mappings: list[Mapping], batches: Tensor, *,
                           batch_size: int = OBSERVE_BATCH, sample_rows: int = 0, progress: bool = True, feed=None
                           ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """max |x| per input channel of each mapping's activation (the input of `observed`: the balance
    layers, or the MoE block whose experts read it), and, when sample_rows > 0, up to that many input
    rows per mapping (evenly spread over the calibration tokens) for the alpha search. A mapping whose
    layers never ran (an expert no calibration token was routed to) has no entry."""
    absmax: dict[str, Tensor] = {}
    samples: dict[str, list[Tensor]] = {m.smooth: [] for m in mappings}
    per_batch = max(1, sample_rows // max(1, -(-batches.shape[0] // batch_size))) if sample_rows else 0
    hooks = []
    for mp in mappings:
        def observe(module, args, key=mp.smooth):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            cur = x.abs().amax(dim=0).float().cpu()
            absmax[key] = cur if key not in absmax else torch.maximum(absmax[key], cur)
            if per_batch:
                rows = torch.linspace(0, x.shape[0] - 1, min(per_batch, x.shape[0])).long()
                samples[key].append(x[rows].float().cpu())
        hooks.append(model.get_submodule(mp.observed).register_forward_pre_hook(observe))
    if feed is not None:
        feed(hooks)
    else:
        feed_calibration(model, batches, hooks, batch_size=batch_size, desc="smoothquant statistics",
                         progress=progress)
    return absmax, {k: torch.cat(v)[:sample_rows] for k, v in samples.items() if v}


def feed_calibration(model: nn.Module, batches: Tensor, hooks: list, *, batch_size: int, desc: str,
                     progress: bool) -> None:
    """Run the calibration batches through `model` so that `hooks` (already registered) observe
    them; the hooks are removed afterwards, also when a forward fails."""
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for chunk in tqdm(batches.split(batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
                forward_for_statistics(model, chunk.to(device))
    finally:
        for h in hooks:
            h.remove()


def apply_smoothing(model: nn.Module, mapping: Mapping, scales: Tensor) -> str | None:
    """Fold `scales` into the mapping; returns why it was not applied, or None when it was.

    A Linear producing the activation scales exactly with its weight rows and bias. Any other
    module (a norm) is checked on a probe input first: Gemma's (1 + w) * x does not scale with w."""
    smooth = model.get_submodule(mapping.smooth)
    weight = getattr(smooth, "weight", None)
    first, last = mapping.rows or (0, getattr(weight, "shape", (0,))[0])
    if not isinstance(weight, Tensor) or last - first != scales.numel():
        return f"{type(smooth).__name__} has no per-channel weight to fold the scales into"
    s = scales.detach().to(device=weight.device, dtype=torch.float32)
    with torch.no_grad():
        if not isinstance(smooth, nn.Linear):
            probe = torch.randn(2, weight.shape[0], generator=torch.Generator().manual_seed(0))
            probe = probe.to(weight.device, weight.dtype)
            before = smooth(probe).float()
            params = [p for p in (weight, getattr(smooth, "bias", None)) if p is not None]
            saved = [p.detach().clone() for p in params]
            _divide_output(smooth, s, first, last)
            after = smooth(probe).float()
            if not torch.allclose(after, before / s, rtol=2e-2, atol=1e-4 * before.abs().max().item()):
                for p, old in zip(params, saved):
                    p.copy_(old)
                return f"{type(smooth).__name__}'s output does not scale with its weight"
        else:
            _divide_output(smooth, s, first, last)
        for name in mapping.balance + mapping.co_scaled:
            w = model.get_submodule(name).weight
            w.mul_(s.to(w.device, w.dtype)[None, :])  # (out, in) * (1, in)
    return None


def _divide_output(smooth: nn.Module, s: Tensor, first: int, last: int) -> None:
    """Divide output channels first..last of `smooth` (a norm's weight, or a Linear's rows) by s."""
    w = smooth.weight
    if w.ndim == 2:  # a Linear producing the activation: scale its output rows
        w[first:last].div_(s.to(w.dtype)[:, None])
    else:
        w[first:last].div_(s.to(w.dtype))
    bias = getattr(smooth, "bias", None)
    if isinstance(bias, Tensor):
        bias[first:last].div_(s.to(bias.dtype))


def usable_mappings(model: nn.Module, batches: Tensor, only: set[str] | None, result: SmoothingResult,
                    within: list[Mapping] | None = None, probe=None) -> list[Mapping]:
    """The mappings to smooth (of `within`, default all): all balance layers are to be quantized
    (`only`), and the readers really read the smoothing module's output (checked on the first
    calibration sample, or by `probe(hooks)`); the others are recorded in `result.skipped`."""
    candidates = find_mappings(model) if within is None else within
    mappings = [m for m in candidates if only is None or all(b in only for b in m.balance)]
    rejected = check_readers(model, mappings, batches[:1], run=probe)
    result.skipped.update(rejected)
    return [m for m in mappings if m.smooth not in rejected]


def fold(model: nn.Module, mapping: Mapping, scales: Tensor, alpha: float, result: SmoothingResult) -> None:
    """apply_smoothing, with the outcome recorded in `result`."""
    why = apply_smoothing(model, mapping, scales)
    if why is None:
        result.applied[mapping.smooth] = alpha
        result.touched.update([mapping.smooth, *mapping.co_scaled])
    else:
        result.skipped[mapping.smooth] = why


NEVER_RAN = "no calibration token reached it (an expert no token was routed to)"


def smooth_model(model: nn.Module, batches: Tensor, alpha: float | str, *, scheme=None,
                 only: set[str] | None = None, progress: bool = True, within: list[Mapping] | None = None,
                 probe=None, feed=None) -> SmoothingResult:
    """Smooth every mapping whose balance layers are all in `only` (the layers to be quantized).

    alpha: a number in [0, 1], or "auto" to search AUTO_ALPHAS per mapping (needs `scheme`,
    the quantization scheme the balance layers will get). A streamed run smooths one decoder
    layer at a time: `within` its mappings, `probe(hooks)` / `feed(hooks)` running that layer on
    its captured inputs (one batch / every batch of `batches`) instead of the whole model.
    """
    auto = alpha == "auto"
    result = SmoothingResult(alpha=alpha)
    mappings = usable_mappings(model, batches, only, result, within, probe)
    absmax, samples = collect_channel_absmax(model, mappings, batches, sample_rows=SAMPLE_ROWS if auto else 0,
                                             progress=progress, feed=feed)
    for mp in tqdm(mappings, desc="smoothing", unit="mapping", disable=not progress, leave=False):
        if mp.smooth not in absmax:
            result.skipped[mp.smooth] = NEVER_RAN
            continue
        balance = [model.get_submodule(b).weight.detach() for b in mp.balance]
        chosen = search_alpha(samples[mp.smooth], balance, absmax[mp.smooth], scheme) if auto else float(alpha)
        weights = torch.stack([w.abs().amax(dim=0).float().cpu() for w in balance]).amax(dim=0)  # (in,)
        fold(model, mp, smoothing_scales(absmax[mp.smooth], weights, chosen), chosen, result)
    return result
