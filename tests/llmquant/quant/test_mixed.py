"""Automatic mixed precision: bit accounting, the greedy choice, and a mixed checkpoint every reader loads."""

import json

import pytest
import torch
from torch import nn

from llmquant.errors import InvalidConfigError
from llmquant.quant.algorithms.mixed import bits_per_weight, choose_schemes
from llmquant.quant.pipeline.plan import LayerPlan
from llmquant.config.presets import preset
from llmquant.config.recipe import MixedPrecisionConfig, Recipe

W4 = preset("W4A16").replace(weights=preset("W4A16").weights.__class__(
    num_bits=4, strategy="group", group_size=64, observer="minmax"))
W8 = preset("W8A16")


def test_bits_per_weight_counts_scales():
    assert bits_per_weight(W4, 576) == 4 + 16 / 64
    assert bits_per_weight(W8, 128) == 8 + 16 / 128
    assert bits_per_weight(None, 128) == 16.0


def _plans(sizes):
    return [LayerPlan(f"l{i}", nn.Linear(cols, rows, bias=False), W4) for i, (rows, cols) in enumerate(sizes)]


def test_greedy_choice_meets_the_bit_target_with_the_most_sensitive_layers():
    plans = _plans([(64, 64)] * 4)
    sens = {"l0": 0.01, "l1": 0.2, "l2": 0.05, "l3": 0.001}
    low, high = bits_per_weight(W4, 64), bits_per_weight(W8, 64)
    target = low + (high - low) * 0.5  # room for two of the four equal-size layers
    choice = choose_schemes(plans, sens, W4, W8, target_bits=target)
    assert {n for n, s in choice.schemes.items() if s == W8} == {"l1", "l2"}
    assert choice.average_bits == pytest.approx(target)
    by_ppl = choose_schemes(plans, sens, W4, W8, max_ppl_increase=2.0)  # log(1.02) = 0.0198
    assert {n for n, s in by_ppl.schemes.items() if s == W8} == {"l1", "l2"}
    assert by_ppl.estimated_ppl_increase_pct == pytest.approx(100 * (torch.tensor(0.011).exp().item() - 1), rel=1e-4)


def test_fast_sensitivities_equal_full_forwards(tiny_model_dir):
    from llmquant import load_model
    from llmquant.quant.algorithms import mixed
    from llmquant.quant.pipeline.plan import plan_layers
    from llmquant.config.recipe import recipe_from_scheme
    from llmquant.quant.pipeline.targets import linear_layers

    net = load_model(tiny_model_dir, dtype="float32").model
    rec = recipe_from_scheme("W4A16").with_overrides(weights={"group_size": 32, "observer": "minmax"})
    plans = plan_layers(rec, list(linear_layers(net, rec.targets, rec.ignore)))
    windows = torch.randint(0, net.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    fast = mixed.layer_sensitivities(net, plans, rec.scheme, windows, progress=False)
    full = mixed.layer_sensitivities(net, plans, rec.scheme, windows, progress=False, reuse_layer_inputs=False)
    assert fast.keys() == full.keys() and len(fast) == 14
    for name in fast:
        assert fast[name] == pytest.approx(full[name], rel=1e-3, abs=1e-7), name
    assert len(set(round(v, 8) for v in fast.values())) > 10  # the layers really differ


def test_recipe_validation():
    r = Recipe.from_yaml("quantize: {scheme: W4A16}\nmixed_precision: {target_bits: 5}\n")
    assert r.mixed_precision == MixedPrecisionConfig(target_bits=5)
    assert Recipe.from_yaml(r.to_yaml()) == r
    with pytest.raises(InvalidConfigError, match="exactly one"):
        MixedPrecisionConfig(target_bits=5, max_ppl_increase=3)
    with pytest.raises(InvalidConfigError, match="W4A16"):
        Recipe.from_yaml("quantize: {scheme: W8A8}\nmixed_precision: {target_bits: 5}\n")


def test_mixed_checkpoint_has_one_group_per_scheme_and_loads_everywhere(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmquant import load_model, quantize

    small = dict(scheme="W4A16", group_size=32, observer="minmax", num_samples=8, seq_len=64, verify_tokens=512,
                 progress=False, dtype="float32")
    uniform = quantize(tiny_model_dir, **small)
    mixed = quantize(tiny_model_dir, target_bits=6.0, output=tmp_path / "q", **small)
    info = mixed.report.mixed_precision
    assert 4.5 < info["average_bits"] <= 6.0 and info["high_layers"]
    assert mixed.verification.kl_mean < uniform.verification.kl_mean

    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    groups = qcfg["config_groups"]
    assert len(groups) == 2 and groups["group_0"]["weights"]["num_bits"] == 4
    assert groups["group_1"]["weights"]["num_bits"] == 8 and sorted(groups["group_1"]["targets"]) == info["high_layers"]

    ids = torch.arange(5, 69)[None]
    with torch.inference_mode():
        ours = mixed.model(ids).logits.double()
        reloaded = load_model(tmp_path / "q", dtype="float32").model
        assert torch.allclose(reloaded(ids).logits.double(), ours, atol=1e-4)
        bits = {n: m.scheme.weights.num_bits for n, m in reloaded.named_modules() if hasattr(m, "scheme")}
        assert sorted(n for n, b in bits.items() if b == 8) == info["high_layers"]
        pytest.importorskip("compressed_tensors")
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)(ids).logits.double()
    assert torch.nn.functional.cosine_similarity(theirs.flatten(), ours.flatten(), dim=0) > 0.999
