"""Quantization math: ranges, rounding bounds, and the ~6 dB-per-bit rule on real tensors."""

import pytest
import torch

from llmquant.config.args import FLOAT, INT, QuantArgs
from llmquant.quant.primitives import (compute_qparams, dequantize, fake_quantize, grouped_view, quantize,
                                       quantize_activation, sqnr_db)


def _args(bits=8, strategy="channel", group_size=None, symmetric=True, type_=INT):
    return QuantArgs(num_bits=bits, type=type_, strategy=strategy, group_size=group_size, symmetric=symmetric)


@pytest.mark.parametrize("row, end", [([-3.0, 1.0, 2.0], -128), ([3.0, -1.0, -2.0], 127), ([-3.0, 1.0, 2.99], 127)])
def test_symmetric_scale_uses_the_whole_grid_without_clipping(row, end):
    w = torch.tensor([row])
    args = _args(bits=8)
    view = grouped_view(w, args)
    scale, zp = compute_qparams(view.amin(-1), view.amax(-1), args)
    assert zp is None
    q = quantize(view, scale, zp, args)
    assert end in q.flatten().tolist()  # the dominant end lands exactly on the grid's end
    deq = dequantize(q, scale, zp).reshape(w.shape)
    assert (deq - w).abs().max() <= scale.max() / 2 + 1e-7  # nothing clipped


def test_asymmetric_range_keeps_zero_exact_and_bounds_error_by_half_a_step():
    torch.manual_seed(0)
    w = torch.rand(16, 64) * 3 + 0.5  # all positive: asymmetric uses the whole grid
    args = _args(bits=4, strategy="group", group_size=32, symmetric=False)
    view = grouped_view(w, args)
    scale, zp = compute_qparams(view.amin(-1), view.amax(-1), args)
    deq = fake_quantize(view, scale, zp, args)
    assert (deq - view).abs().max() <= scale.max() / 2 + 1e-6
    zeros = torch.zeros(16, 2, 32)
    assert torch.equal(fake_quantize(zeros, scale, zp, args), zeros)


def test_six_db_per_bit_on_gaussian_weights():
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    measured = {}
    for bits in (4, 8):
        args = _args(bits=bits)
        view = grouped_view(w, args)
        scale, zp = compute_qparams(view.amin(-1), view.amax(-1), args)
        measured[bits] = sqnr_db(view, fake_quantize(view, scale, zp, args))
    assert 20 < measured[8] - measured[4] < 28  # 4 bits x 6.02 dB = 24 dB
    assert measured[8] > 38


def test_fp8_relative_error_is_bounded_by_its_mantissa():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    args = _args(type_=FLOAT, strategy="tensor")
    view = grouped_view(w, args)
    scale, _ = compute_qparams(view.amin(-1), view.amax(-1), args)
    q = quantize(view, scale, None, args)
    assert q.dtype == torch.float8_e4m3fn
    deq = dequantize(q, scale, None)
    big = view.abs() > 1e-2 * view.abs().max()  # normal range of E4M3 with this scale
    rel = ((deq - view).abs() / view.abs())[big]
    assert rel.max() <= 2 ** -4 + 1e-6  # 3 mantissa bits: half a step is 1/16


@pytest.mark.parametrize("type_", [INT, FLOAT])
def test_dynamic_per_token_activation_scales_each_row_independently(type_):
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 3.0, -50.0]])
    args = QuantArgs(num_bits=8, type=type_, strategy="token", dynamic=True)
    xq = quantize_activation(x, args)
    # The small row is not crushed by the large row's range.
    assert torch.allclose(xq[0], x[0], rtol=0.07)
    assert xq[1, 0] == pytest.approx(100.0, rel=1e-6)


def test_static_activation_scale_clips_outliers():
    args = QuantArgs(num_bits=8, type=INT, strategy="tensor")
    x = torch.tensor([[0.5, 10.0]])
    xq = quantize_activation(x, args, static_scale=torch.tensor(1.0 / 127))
    assert xq[0, 1] == pytest.approx(1.0)  # clipped at 127 * scale
    assert xq[0, 0] == pytest.approx(round(0.5 * 127) / 127)
