"""Observers choose the range [lo, hi] that a quantization grid covers.

Weights (data-free, per channel/group/tensor):
- `minmax`: the full range; nothing is clipped.
- `percentile`: clip each slice at its p-th percentile of |w| (symmetric) or at the
  (100-p)-th / p-th percentiles (asymmetric), linearly interpolated between ranks.
- `mse`: shrink the min-max range by factors 1.00, 0.99, ... 0.80 and keep, per slice, the
  one that minimizes sum |w - Q(w)|^2.4 (the search GPTQ's reference code uses): trading a
  little clipping of rare large weights for finer steps everywhere else.

Activations (static per-tensor schemes): a streaming histogram of |x| per layer, so memory
stays bounded however much calibration text is used; `minmax` takes its max, `percentile`
reads the percentile off the histogram. The same histogram tells how many calibration values
the chosen range clips and estimates the activation SQNR for the report.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from llmquant.config.args import FLOAT, QuantArgs
from llmquant.quant.primitives import compute_qparams, fake_quantize, grouped_view, quantize_activation

MSE_GRID = 100
MSE_MAX_SHRINK = 0.20
MSE_NORM = 2.4


def round_scale(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The scale as it will be stored (and read back by any runtime), in float32, rounded up.

    Rounded to nearest, a bf16 scale can come out up to 0.4% small, which puts the extreme
    weight of the range past the last grid level: clipped by up to half a step at 8 bits. Up,
    the range always fits, which is what `minmax` promises.
    """
    scale = scale.float()
    if dtype == torch.float32:
        return scale
    stored = scale.to(dtype)
    below = stored.float() < scale
    stored = torch.where(below, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    return stored.float()


def qparams_for_range(lo: Tensor, hi: Tensor, args: QuantArgs, scale_dtype: torch.dtype
                      ) -> tuple[Tensor, Tensor | None]:
    """Scale (rounded to its storage dtype) and a zero point consistent with that rounding."""
    scale, _ = compute_qparams(lo, hi, args)
    scale = round_scale(scale, scale_dtype)
    if args.symmetric:
        return scale, None
    lo0 = torch.minimum(lo.float(), torch.zeros_like(scale))
    zero_point = torch.clamp(torch.round(args.qmin - lo0 / scale), args.qmin, args.qmax)
    return scale, zero_point


def _kth_interpolated(values: Tensor, q: float) -> Tensor:
    """The q-quantile along the last dim with linear interpolation (torch.quantile's definition),
    via kthvalue: torch.quantile refuses tensors over 16M elements. Interpolating matters for
    small groups: over 64 values the nearest-rank 99.9th percentile is the max itself."""
    n = values.shape[-1]
    pos = q * (n - 1)
    lower = int(math.floor(pos))
    frac = pos - lower
    lo = values.kthvalue(lower + 1, dim=-1).values
    if frac == 0.0 or lower + 1 >= n:
        return lo
    hi = values.kthvalue(lower + 2, dim=-1).values
    return lo + frac * (hi - lo)


def _percentile_range(view: Tensor, args: QuantArgs) -> tuple[Tensor, Tensor]:
    q = args.percentile / 100.0
    if args.symmetric:
        hi = _kth_interpolated(view.abs(), q)
        return -hi, hi
    return _kth_interpolated(view, 1.0 - q), _kth_interpolated(view, q)


def shrink_search(view: Tensor, args: QuantArgs, scale_dtype: torch.dtype, error
                  ) -> tuple[Tensor, Tensor | None]:
    """Per slice of a grouped view, the range min-max x (1.00, 0.99, ... 1 - MSE_MAX_SHRINK)
    whose rounding minimizes `error(dequantized - view)` (summed over the last dim by `error`)."""
    lo, hi = view.amin(dim=-1), view.amax(dim=-1)
    best_scale, best_zp = qparams_for_range(lo, hi, args, scale_dtype)
    best_err = error(fake_quantize(view, best_scale, best_zp, args) - view)
    for i in range(1, int(MSE_MAX_SHRINK * MSE_GRID) + 1):
        shrink = 1.0 - i / MSE_GRID
        scale, zp = qparams_for_range(lo * shrink, hi * shrink, args, scale_dtype)
        err = error(fake_quantize(view, scale, zp, args) - view)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zp is not None:
            best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


MSE_CHUNK = 1 << 21  # values per slice of rows searched at once: bounds the search's temporaries


def _mse_qparams(view: Tensor, args: QuantArgs, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    # Rows are searched independently, so a slice of rows at a time gives the same scales with a
    # few tens of MB of temporaries instead of several copies of the whole weight.
    rows = max(1, MSE_CHUNK // max(1, view[0].numel())) if view.ndim > 1 else view.shape[0]
    parts = [shrink_search(part, args, scale_dtype, lambda d: d.abs().pow(MSE_NORM).sum(-1))
             for part in view.split(rows)]
    scales = torch.cat([scale for scale, _ in parts])
    zero_points = None if parts[0][1] is None else torch.cat([zp for _, zp in parts])
    return scales, zero_points


def weight_qparams(weight: Tensor, args: QuantArgs, scale_dtype: torch.dtype = torch.float32
                   ) -> tuple[Tensor, Tensor | None]:
    """Scale and zero point for a (out, in) weight, shaped as compressed-tensors stores them."""
    view = grouped_view(weight.float(), args)
    if args.observer == "mse":
        scale, zp = _mse_qparams(view, args, scale_dtype)
    else:
        if args.observer == "percentile":
            lo, hi = _percentile_range(view, args)
        else:
            lo, hi = view.amin(dim=-1), view.amax(dim=-1)
        scale, zp = qparams_for_range(lo, hi, args, scale_dtype)
    out_f, in_f = weight.shape
    shape = (1,) if args.strategy == "tensor" else (out_f, view.shape[1])
    return scale.reshape(shape), (zp.reshape(shape) if zp is not None else None)


class ActivationHistogram:
    """Streaming histogram of |x| for one layer's inputs; memory is BINS counters.

    The range starts at the first batch's max and doubles (merging bin pairs) whenever a
    later batch exceeds it, so every value ever seen is counted.
    """

    BINS = 4096

    def __init__(self, args: QuantArgs):
        self.args = args
        self.counts: Tensor | None = None
        self.upper = 0.0
        self.absmax = 0.0
        self.total = 0

    def update(self, x: Tensor) -> None:
        a = x.detach().float().abs().flatten()
        if a.numel() == 0:
            return
        m = float(a.max())
        if self.counts is None:
            self.upper = m if m > 0 else 1.0
            self.counts = torch.zeros(self.BINS, dtype=torch.float64)
        while m > self.upper:
            merged = self.counts.view(-1, 2).sum(dim=1)
            self.counts = torch.cat([merged, torch.zeros_like(merged)])
            self.upper *= 2.0
        self.counts += torch.histc(a, bins=self.BINS, min=0.0, max=self.upper).to(torch.float64).cpu()
        self.absmax = max(self.absmax, m)
        self.total += a.numel()

    @property
    def bin_width(self) -> float:
        return self.upper / self.BINS

    def threshold(self) -> float:
        """The clipping threshold chosen by the observer: |x| above it saturates."""
        if self.counts is None:
            raise ValueError("no activations were observed")
        if self.args.observer == "minmax":
            return self.absmax
        target = self.args.percentile / 100.0 * self.total
        cum = torch.cumsum(self.counts, 0)
        idx = int(torch.searchsorted(cum, torch.tensor(target, dtype=torch.float64)))
        idx = min(idx, self.BINS - 1)
        below = float(cum[idx - 1]) if idx > 0 else 0.0
        inside = float(self.counts[idx])
        frac = (target - below) / inside if inside > 0 else 1.0
        return min(self.absmax, (idx + frac) * self.bin_width)

    def scale(self) -> float:
        t = self.threshold()
        return t / self.args.qmax if t > 0 else 1.0

    def clip_fraction(self) -> float:
        """Fraction of observed values whose magnitude exceeds the threshold."""
        t = self.threshold()
        if self.counts is None or self.total == 0 or t >= self.absmax:
            return 0.0
        pos = t / self.bin_width
        idx = min(int(pos), self.BINS - 1)
        above = float(self.counts[idx + 1:].sum()) + float(self.counts[idx]) * (1.0 - (pos - idx))
        return above / self.total

    def sqnr_db(self) -> float:
        """Activation SQNR estimated from the histogram: clipping error above the threshold,
        uniform rounding noise (step^2 / 12) below it."""
        if self.counts is None:
            return float("nan")
        t, scale = self.threshold(), self.scale()
        centers = (torch.arange(self.BINS, dtype=torch.float64) + 0.5) * self.bin_width
        if self.args.type == FLOAT:
            # E4M3 spacing at |x|/scale: 2^(floor(log2 v) - 3), subnormal spacing 2^-9.
            v = (centers / scale).clamp(min=2.0 ** -6)
            step = torch.pow(2.0, torch.floor(torch.log2(v)) - 3) * scale
        else:
            step = torch.full_like(centers, scale)
        noise = torch.where(centers > t, (centers - t) ** 2, step ** 2 / 12.0)
        signal = float((self.counts * centers ** 2).sum())
        err = float((self.counts * noise).sum())
        return 10.0 * math.log10(signal / err) if err > 0 and signal > 0 else float("inf")


class DynamicActivationError:
    """Activation SQNR of a dynamic per-token scheme, accumulated over calibration data.

    Each token is quantized on its own, so evenly spaced tokens of a batch (at most
    SAMPLED_TOKENS) estimate the same ratio without bias; quantizing every token of every layer
    made this report most of an FP8_DYNAMIC run's time (profiled)."""

    SAMPLED_TOKENS = 256

    def __init__(self, args: QuantArgs):
        self.args = args
        self.signal = 0.0
        self.noise = 0.0
        self.total = 0

    def update(self, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        step = -(-rows.shape[0] // self.SAMPLED_TOKENS)
        xf = rows[::step].float()
        xq = quantize_activation(xf, self.args)
        self.signal += float(xf.pow(2).sum())
        self.noise += float((xf - xq).pow(2).sum())
        self.total += xf.numel()

    def sqnr_db(self) -> float:
        if self.noise == 0:
            return float("inf")
        return 10.0 * math.log10(self.signal / self.noise) if self.signal > 0 else float("-inf")
