"""GPTQ refinements: Hessian-weighted clipping and least-squares scale refits."""

import pytest
import torch

from llmquant.config.args import QuantArgs
from llmquant.quant.algorithms.gptq import gptq_quantize_weight
from llmquant.quant.algorithms.gptq_scales import hessian_weighted_qparams, output_error, refit_scales
from llmquant.quant.observers import weight_qparams
from llmquant.quant.primitives import fake_quantize, grouped_view

INT4_G32 = QuantArgs(num_bits=4, strategy="group", group_size=32, observer="minmax")
INT4_G32_ASYM = QuantArgs(num_bits=4, strategy="group", group_size=32, symmetric=False, observer="minmax")
INT8_CHANNEL = QuantArgs(num_bits=8, strategy="channel")


def _err(w, approx, h):
    return float(output_error(w, approx, h).sum())


@pytest.mark.parametrize("args", [INT4_G32, INT4_G32_ASYM, INT8_CHANNEL], ids=lambda a: a.describe())
def test_refit_is_the_least_squares_scale_and_never_worse(layer, args):
    w, _, h = layer
    view = grouped_view(w, args)
    scale, zp = weight_qparams(w, args)
    codes = torch.clamp(torch.round(view / scale.reshape(*view.shape[:2], 1)
                                    + (0 if zp is None else zp.reshape(*view.shape[:2], 1))), args.qmin, args.qmax)
    codes = codes.reshape(w.shape)
    new = refit_scales(w, h, codes, scale, zp, torch.float32)
    a = codes - (0 if zp is None else zp.repeat_interleave(view.shape[2], dim=1))

    def approx(s):
        return a * s.repeat_interleave(view.shape[2], dim=1)

    before, after = output_error(w, approx(scale), h), output_error(w, approx(new), h)
    assert (after <= before + 1e-6).all()
    assert after.sum() < 0.97 * before.sum(), (after.sum(), before.sum())
    # Row 0 against a direct least-squares solve of |(w - A diag(s)) H^1/2|.
    root = torch.linalg.cholesky(h.double())  # H = L L^T
    groups = scale.shape[1]
    basis = torch.zeros(groups, w.shape[1], dtype=torch.float64)
    for g in range(groups):
        cols = slice(g * view.shape[2], (g + 1) * view.shape[2])
        basis[g, cols] = a[0, cols].double()
    direct = torch.linalg.lstsq((basis @ root).t(), (w[0].double() @ root)).solution
    assert torch.allclose(new[0].double(), direct, rtol=1e-3)


def test_weighted_clipping_lowers_the_weighted_error(layer):
    w, _, h = layer
    view = grouped_view(w, INT4_G32)
    importance = torch.diag(h).reshape(view.shape[1:])
    minmax = weight_qparams(w, INT4_G32)
    weighted = hessian_weighted_qparams(view, importance, INT4_G32, torch.float32)

    def weighted_error(scale):
        deq = fake_quantize(view, scale.reshape(view.shape[:2]), None, INT4_G32)
        return float(((deq - view).pow(2) * importance).sum())

    assert weighted_error(weighted[0]) < 0.9 * weighted_error(minmax[0])


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_weighted_clipping_and_refits_beats_plain_gptq(layer, act_order):
    w, _, h = layer
    plain = gptq_quantize_weight(w, h, INT4_G32, act_order=act_order)
    refined = gptq_quantize_weight(w, h, INT4_G32, act_order=act_order, weighted_clipping=True, refit_rounds=2)
    assert _err(w, refined.dequantized, h) < 0.95 * _err(w, plain.dequantized, h)
    # Still the stored format: dequantized == (q - zp) * scale per group.
    deq = refined.q.float() * refined.scale.repeat_interleave(32, dim=1)
    assert torch.allclose(deq, refined.dequantized)


def test_a_large_refit_runs_a_slice_of_rows_at_a_time_with_the_same_result(monkeypatch):
    # The refit's temporary is rows x groups x group_size x groups floats (6.4 GB for a 3B model's
    # down_proj): above REFIT_MEMORY it works on slices of rows, each row's system as before.
    from llmquant.quant.algorithms import gptq_scales

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    x = torch.randn(512, 256, generator=g)
    h = x.t() @ x / 512
    scale = (w.reshape(64, 8, 32).abs().amax(-1) / 7).clamp(min=1e-6)
    codes = torch.clamp(torch.round(w / scale.repeat_interleave(32, 1)), -8, 7)
    whole = gptq_scales.refit_scales(w, h, codes, scale, None, torch.float32)
    calls = []
    original = gptq_scales.refit_scales

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(gptq_scales, "refit_scales", counting)
    monkeypatch.setattr(gptq_scales, "REFIT_MEMORY", 8 * 32 * 8 * 4 * 10)  # ten rows' worth
    sliced = gptq_scales.refit_scales(w, h, codes, scale, None, torch.float32)
    assert calls[0] == 64 and calls[1:] == [10] * 6 + [4]
    # The same scales up to the last bits: BLAS may order a batched solve differently per batch size.
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=0)
