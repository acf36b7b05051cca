"""Observers: what range they pick, what it clips, and that clipping search beats min-max."""

import math

import pytest
import torch

from llmquant.config.args import FLOAT, INT, QuantArgs
from llmquant.quant.observers import ActivationHistogram, DynamicActivationError, weight_qparams
from llmquant.quant.primitives import dequantize, grouped_view, quantize, quantize_activation, sqnr_db


def _weights_with_outliers(seed=0):
    torch.manual_seed(seed)
    w = torch.randn(128, 256)
    w[torch.rand_like(w) < 0.002] *= 8.0  # a few large weights, as real layers have
    return w


def _sqnr(w, args):
    scale, zp = weight_qparams(w, args)
    view = grouped_view(w, args)
    return sqnr_db(view, dequantize(quantize(view, scale, zp, args), scale, zp))


def test_minmax_never_clips():
    w = _weights_with_outliers()
    args = QuantArgs(num_bits=4, strategy="group", group_size=64)
    scale, _ = weight_qparams(w, args)
    q = quantize(grouped_view(w, args), scale, None, args)
    view = grouped_view(w, args)
    deq = q.float() * scale.reshape(view.shape[0], view.shape[1], 1)
    assert (deq - view).abs().max() <= scale.max() / 2 + 1e-6  # every weight within half a step
    lo, hi = view.amin(-1), view.amax(-1)
    assert torch.allclose(scale.reshape(-1), torch.maximum(-lo / 8, hi / 7).reshape(-1))


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_search_beats_minmax_at_4_bits(symmetric):
    w = _weights_with_outliers()
    base = dict(num_bits=4, strategy="group", group_size=64, symmetric=symmetric)
    minmax = _sqnr(w, QuantArgs(**base, observer="minmax"))
    mse = _sqnr(w, QuantArgs(**base, observer="mse"))
    assert mse > minmax + 0.2, (mse, minmax)  # a search that never shrinks gives exactly minmax


def test_percentile_clips_the_top_of_each_channel():
    w = _weights_with_outliers()
    args = QuantArgs(num_bits=8, strategy="channel", observer="percentile", percentile=99.0)
    scale, _ = weight_qparams(w, args)
    thresholds = scale.reshape(-1) * 127
    clipped = (w.abs() > thresholds[:, None] + 1e-6).float().mean().item()
    assert 0.002 < clipped < 0.02  # about 1% of each row sits above its 99th percentile


def test_scales_are_rounded_up_to_their_storage_dtype_so_minmax_clips_nothing():
    w = torch.randn(256, 64)
    args = QuantArgs(num_bits=8, strategy="channel")
    exact, _ = weight_qparams(w, args)
    scale, _ = weight_qparams(w, args, scale_dtype=torch.bfloat16)
    assert torch.equal(scale, scale.to(torch.bfloat16).float())  # representable as stored
    assert (scale >= exact).all() and (scale <= exact * (1 + 2 ** -7)).all()  # the next bf16 up at most
    assert (scale > exact).any()  # (rounding to nearest would have gone down for about half)
    q = quantize(grouped_view(w, args), scale, None, args).reshape(w.shape).float()
    assert (q * scale - w).abs().max() <= scale.max() / 2 + 1e-6  # every weight within half a step


def test_histogram_percentile_matches_exact_quantile_over_streamed_batches():
    torch.manual_seed(0)
    args = QuantArgs(num_bits=8, strategy="tensor", observer="percentile", percentile=99.9)
    hist = ActivationHistogram(args)
    batches = [torch.randn(64, 128) * (1 + i) for i in range(6)]  # range grows: forces rebinning
    for b in batches:
        hist.update(b)
    everything = torch.cat([b.abs().flatten() for b in batches])
    assert hist.total == everything.numel()
    assert float(hist.counts.sum()) == everything.numel()  # nothing lost when bins merge
    exact = torch.quantile(everything, 0.999).item()
    assert abs(hist.threshold() - exact) <= 2 * hist.bin_width
    assert hist.clip_fraction() == pytest.approx(0.001, abs=2e-4)


def test_histogram_minmax_uses_the_exact_max_and_clips_nothing():
    args = QuantArgs(num_bits=8, strategy="tensor")
    hist = ActivationHistogram(args)
    hist.update(torch.tensor([[0.1, -7.25, 3.0]]))
    assert hist.threshold() == 7.25
    assert hist.scale() == pytest.approx(7.25 / 127)
    assert hist.clip_fraction() == 0.0


@pytest.mark.parametrize("type_", [INT, FLOAT])
def test_histogram_sqnr_estimate_tracks_measured_sqnr(type_):
    torch.manual_seed(0)
    args = QuantArgs(num_bits=8, type=type_, strategy="tensor", observer="percentile", percentile=99.99)
    x = torch.randn(256, 512)
    hist = ActivationHistogram(args)
    hist.update(x)
    measured = sqnr_db(x, quantize_activation(x, args, torch.tensor(hist.scale())))
    assert abs(hist.sqnr_db() - measured) < 1.5, (hist.sqnr_db(), measured)


def test_dynamic_error_is_exact_on_small_batches():
    torch.manual_seed(0)
    args = QuantArgs(num_bits=8, strategy="token", dynamic=True)
    x = torch.randn(32, 64)
    stat = DynamicActivationError(args)
    stat.update(x[:16])
    stat.update(x[16:])
    assert stat.sqnr_db() == pytest.approx(sqnr_db(x, quantize_activation(x, args)), abs=1e-3)
    assert math.isfinite(stat.sqnr_db())


def test_dynamic_error_on_sampled_tokens_estimates_the_whole_batch():
    """Batches past SAMPLED_TOKENS rows are measured on evenly spaced tokens: same SQNR within
    0.2 dB on activations whose tokens differ in scale (a few loud ones), as real ones do."""
    torch.manual_seed(0)
    args = QuantArgs(num_bits=8, strategy="token", dynamic=True)
    x = torch.randn(4, 1024, 64) * torch.rand(4, 1024, 1) * 3
    x[..., :2] *= 20.0
    stat = DynamicActivationError(args)
    stat.update(x)
    flat = x.reshape(-1, 64)
    assert stat.total == 256 * 64  # sampled, not all 4,096 tokens
    assert stat.sqnr_db() == pytest.approx(sqnr_db(flat, quantize_activation(flat, args)), abs=0.2)


def test_percentile_interpolates_like_torch_quantile_and_clips_small_groups():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    args = QuantArgs(num_bits=4, strategy="group", group_size=64, observer="percentile", percentile=99.9)
    scale, _ = weight_qparams(w, args)
    view = grouped_view(w, args)
    expected = torch.quantile(view.abs(), 0.999, dim=-1)
    lo_hi_scale = torch.maximum(expected / 8, expected / 7)  # symmetric range [-t, t]
    assert torch.allclose(scale, lo_hi_scale, rtol=1e-6)
    assert (expected < view.abs().amax(-1)).all()  # it does clip, even in a group of 64
