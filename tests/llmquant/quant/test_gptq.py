"""GPTQ: the pure math (Hessian, error feedback, act-order permutation) and the model-level path."""

import json

import pytest
import torch

from llmquant.errors import InvalidConfigError
from llmquant.config.args import QuantArgs
from llmquant.quant.algorithms.gptq import gptq_quantize_weight
from llmquant.quant.observers import weight_qparams
from llmquant.quant.primitives import dequantize, fake_quantize, grouped_view, quantize
from llmquant.config.recipe import GPTQConfig, Recipe

INT4_G32 = QuantArgs(num_bits=4, strategy="group", group_size=32, observer="minmax")
INT4_G32_ASYM = QuantArgs(num_bits=4, strategy="group", group_size=32, symmetric=False, observer="minmax")
INT4_G32_MSE = QuantArgs(num_bits=4, strategy="group", group_size=32, observer="mse")
INT8_CHANNEL = QuantArgs(num_bits=8, strategy="channel")


def _rtn(w, args):
    scale, zp = weight_qparams(w, args)
    return fake_quantize(grouped_view(w, args), scale, zp, args).reshape(w.shape)


def _output_error(x, w, approx):
    return ((x @ (w - approx).t()).pow(2).sum() / (x @ w.t()).pow(2).sum()).item()


def test_hessian_is_the_running_mean_of_2xxT(layer):
    _, x, h = layer
    assert torch.allclose(h, 2.0 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("args", [INT4_G32, INT4_G32_ASYM, INT4_G32_MSE, INT8_CHANNEL], ids=lambda a: a.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_lower_than_rounding(layer, args, act_order):
    w, x, h = layer
    result = gptq_quantize_weight(w, h, args, act_order=act_order, block_size=48)
    rtn, gptq = _output_error(x, w, _rtn(w, args)), _output_error(x, w, result.dequantized)
    assert gptq < 0.6 * rtn, (gptq, rtn)


@pytest.mark.parametrize("args", [INT4_G32, INT4_G32_ASYM, INT8_CHANNEL], ids=lambda a: a.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_stored_values_mean_what_gptq_computed(layer, args, act_order):
    """Read back as any runtime reads the checkpoint (grouped view, scales per original group),
    the stored integers give exactly GPTQ's dequantized weight: the permutation was undone and
    the scales belong to the columns they are stored with."""
    w, _, h = layer
    r = gptq_quantize_weight(w, h, args, act_order=act_order, block_size=48)
    assert r.q.dtype == torch.int8 and r.q.shape == w.shape
    assert r.scale.shape == ((96, 4) if args.strategy == "group" else (96, 1))
    assert int(r.q.min()) >= args.qmin and int(r.q.max()) <= args.qmax
    read_back = dequantize(grouped_view(r.q, args), r.scale, r.zero_point).reshape(w.shape)
    assert torch.equal(read_back, r.dequantized)
    # Requantizing GPTQ's weight with its own scales gives back the same integers.
    assert torch.equal(quantize(grouped_view(r.dequantized, args), r.scale, r.zero_point, args).reshape(w.shape), r.q)


@pytest.mark.parametrize("act_order", [False, True])
def test_uncorrelated_inputs_reduce_to_plain_rounding(act_order):
    """With a diagonal Hessian no column's error can be compensated by another: GPTQ must give
    exactly the round-to-nearest integers and scales."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 96, generator=g)
    h = torch.diag(torch.rand(96, generator=g) + 0.1)
    for args in (INT4_G32, INT4_G32_ASYM, INT8_CHANNEL):
        r = gptq_quantize_weight(w, h, args, act_order=act_order)
        scale, zp = weight_qparams(w, args)
        assert torch.equal(r.scale, scale)
        assert torch.equal(r.q, quantize(grouped_view(w, args), scale, zp, args).reshape(w.shape))


def test_act_order_follows_the_columns_when_inputs_are_permuted(layer):
    """Permuting the input features (weight columns and Hessian together) permutes the result
    exactly: the act-order permutation and its inverse are applied consistently."""
    w, _, h = layer
    perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(2))
    a = gptq_quantize_weight(w, h, INT8_CHANNEL, act_order=True)
    b = gptq_quantize_weight(w[:, perm], h[perm][:, perm], INT8_CHANNEL, act_order=True)
    assert torch.equal(b.q, a.q[:, perm])
    assert torch.equal(b.scale, a.scale)
    # Without act-order the column order matters, so the test above is not vacuous.
    c = gptq_quantize_weight(w[:, perm], h[perm][:, perm], INT8_CHANNEL, act_order=False)
    assert not torch.equal(c.q, a.q[:, perm])


def test_stacked_rows_quantize_as_separate_layers(layer):
    """q/k/v share one Hessian and are quantized as one stacked matrix: rows are independent."""
    w, _, h = layer
    both = gptq_quantize_weight(w, h, INT4_G32)
    top = gptq_quantize_weight(w[:40], h, INT4_G32)
    assert torch.equal(both.scale[:40], top.scale)
    assert (both.q[:40] == top.q).float().mean() > 0.999  # float summation order may flip a tie


def test_recipe_yaml_round_trip_and_errors():
    r = Recipe.from_yaml("quantize: {scheme: W8A8}\nsmoothquant: {alpha: 0.5}\ngptq: {block_size: 64, act_order: true}\n")
    assert r.gptq == GPTQConfig(block_size=64, dampening=0.01, act_order=True)
    assert r.smoothquant.alpha == 0.5
    assert Recipe.from_yaml(r.to_yaml()) == r
    assert Recipe.from_yaml("quantize: {scheme: W4A16}\ngptq: {}\n").gptq == GPTQConfig()
    with pytest.raises(InvalidConfigError, match="block_size, dampening"):
        Recipe.from_yaml("quantize: {scheme: W4A16}\ngptq: {blocksize: 64}\n")
    with pytest.raises(InvalidConfigError, match="dampening"):
        GPTQConfig(dampening=0.0)


def _kl(result):
    return result.verification.kl_mean


SMALL = dict(num_samples=16, seq_len=128, verify_tokens=512, progress=False, dtype="float32")


def test_model_gptq_beats_rounding_and_loads_everywhere(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmquant import load_model, quantize

    rtn = quantize(tiny_model_dir, scheme="W4A16", group_size=32, observer="minmax", **SMALL)
    gptq = quantize(tiny_model_dir, scheme="W4A16", group_size=32, observer="minmax", gptq=True, act_order=True,
                    output=tmp_path / "q", **SMALL)
    assert _kl(gptq) < 0.8 * _kl(rtn), (_kl(gptq), _kl(rtn))
    assert gptq.recipe.gptq == GPTQConfig(act_order=True)
    assert all(r.output_sqnr_db is not None for r in gptq.report.layers)

    # The standard compressed-tensors layout: no g_idx tensor, no actorder in the config.
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["actorder"] is None
    from safetensors import safe_open

    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "g_idx" in k]

    ids = torch.arange(5, 69)[None]
    with torch.inference_mode():
        ours = gptq.model(ids).logits.double()
        reloaded = load_model(tmp_path / "q", dtype="float32").model(ids).logits.double()
        assert torch.allclose(reloaded, ours, atol=1e-4)
        pytest.importorskip("compressed_tensors")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
        theirs = hf(ids).logits.double()
    assert torch.nn.functional.cosine_similarity(theirs.flatten(), ours.flatten(), dim=0) > 0.999


def test_smoothquant_then_gptq_for_w8a8(tiny_model_dir):
    from llmquant import quantize

    plain = quantize(tiny_model_dir, scheme="W8A8", smoothquant=False, **SMALL)
    both = quantize(tiny_model_dir, scheme="W8A8", smoothquant=0.5, gptq=True, **SMALL)
    assert both.report.smoothquant["applied"] == 6
    assert all(r.scheme.endswith("(GPTQ)") and r.activation_sqnr_db is not None for r in both.report.layers)
    assert _kl(both) < _kl(plain)


def test_same_result_on_every_device(layer, device):
    w, _, h = layer
    cpu = gptq_quantize_weight(w, h, INT4_G32, act_order=True)
    here = gptq_quantize_weight(w.to(device), h.to(device), INT4_G32, act_order=True)
    assert here.q.device.type == device.type
    assert (here.q.cpu() == cpu.q).float().mean() > 0.99  # matmul order may flip a few ties
    assert torch.allclose(here.scale.cpu(), cpu.scale)
