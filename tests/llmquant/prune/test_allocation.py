"""Outlier-weighted allocation (`sparsity.allocation: outlier`): per-decoder-layer fractions that
spend one global budget, fewer zeros where the input-weighted weights have more outliers; and
ADMM pruning inside GPTQ's pass."""

from __future__ import annotations

import json

import pytest
import torch

import llmquant
from llmquant.config.sparsity import SparsityConfig
from llmquant.errors import InvalidConfigError
from llmquant.prune.allocation import outlier_fractions
from llmquant.prune.masks import follows_n_of_m
from llmquant.quant.linear import QuantizedLinear
from llmquant.quant.pipeline.targets import linear_layers

QUANT = dict(num_samples=8, seq_len=64, progress=False)


def _batches(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (8, 64), generator=torch.Generator().manual_seed(0))


def _by_decoder_layer(fractions: dict[str, float]) -> dict[int, set[float]]:
    out: dict[int, set[float]] = {}
    for name, f in fractions.items():
        out.setdefault(int(name.split(".")[2]), set()).add(round(f, 9))
    return out


def test_the_layer_with_outliers_keeps_more_and_the_budget_holds(tiny_model_dir):
    loaded = llmquant.load_model(tiny_model_dir, dtype="float32")
    net = loaded.model
    layers = dict(linear_layers(net, ("Linear",), ("lm_head",)))
    cfg = SparsityConfig(method="wanda", sparsity=0.6, allocation="outlier", allocation_range=0.05)
    batches = _batches(net.config.vocab_size)
    before = _by_decoder_layer(outlier_fractions(net, layers, cfg, batches))
    # A few loud input channels in decoder layer 0 (as LLMs' massive activations are): its
    # attention and MLP inputs now hold many outlier scores.
    with torch.no_grad():
        for norm in (net.model.layers[0].input_layernorm, net.model.layers[0].post_attention_layernorm):
            norm.weight[:6] *= 40.0
    fractions = outlier_fractions(net, layers, cfg, batches)
    per_layer = _by_decoder_layer(fractions)
    assert all(len(v) == 1 for v in per_layer.values())  # one fraction per decoder layer
    (f0,), (f1,) = per_layer[0], per_layer[1]
    assert f0 < f1 and f1 - f0 == pytest.approx(2 * 0.05)  # the spread is the configured range
    # Without the loud channels, layer 0 was the one pruned more: the outliers turned it round.
    assert next(iter(before[0])) > next(iter(before[1]))
    total = sum(m.weight.numel() for m in layers.values())
    assert sum(fractions[n] * m.weight.numel() for n, m in layers.items()) / total == pytest.approx(0.6)


def test_prune_and_quantize_follow_the_allocation(tiny_model_dir, tmp_path):
    result = llmquant.prune(tiny_model_dir, tmp_path / "p", method="sparsegpt", allocation="outlier",
                            calibration=llmquant.CalibrationConfig(num_samples=8, seq_len=64), verify_tokens=0,
                            progress=False)
    report = json.loads((tmp_path / "p" / "prune_report.json").read_text())
    assert report["sparsity"]["allocation"] == "outlier"
    assert report["sparsity"]["measured"] == pytest.approx(0.5, abs=2e-3)  # the budget, whatever the split
    per_layer = {}
    for layer in report["layers"]:
        per_layer.setdefault(int(layer["name"].split(".")[2]), []).append(layer["sparsity"])
    means = [sum(v) / len(v) for _, v in sorted(per_layer.items())]
    assert max(means) - min(means) == pytest.approx(0.16, abs=0.01)  # 2 x the default range
    assert result.report["sparsity"]["measured"] == report["sparsity"]["measured"]

    q = llmquant.quantize(tiny_model_dir, scheme="W8A16", gptq=True, prune="sparsegpt", sparsity_allocation="outlier",
                          output=tmp_path / "q", **QUANT)
    zeros = {name: float((w == 0).float().mean()) for name, w in
             ((n, m.dequantized_weight()) for n, m in llmquant.load_model(tmp_path / "q").model.named_modules()
              if isinstance(m, QuantizedLinear))}
    assert max(zeros.values()) - min(zeros.values()) > 0.1
    assert q.report.sparsity["allocation"] == "outlier"


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_admm_24_inside_gptq(arch, architecture_dir, tmp_path):
    out = tmp_path / "q"
    result = llmquant.quantize(architecture_dir(arch), scheme="W4A16", group_size=16, gptq=True, prune="admm",
                               sparsity_pattern="2:4", prune_iterations=8, output=out, **QUANT)
    assert result.report.sparsity["method"] == "admm" and result.report.sparsity["iterations"] == 8
    weights = {n: m.dequantized_weight() for n, m in llmquant.load_model(out).model.named_modules()
               if isinstance(m, QuantizedLinear)}
    assert len(weights) == len(result.report.layers) > 0
    for name, w in weights.items():
        assert follows_n_of_m(w != 0, 2, 4), name


@pytest.mark.parametrize("bad, message", [
    (dict(method="sparsegpt", pattern="2:4", allocation="outlier"), "unstructured"),
    (dict(method="magnitude", allocation="outlier"), "calibration data"),
    (dict(allocation="outlier", allocation_range=0.6), "allocation_range"),
    (dict(allocation="global"), "sparsity.allocation"),
])
def test_bad_allocations_are_named(bad, message):
    with pytest.raises(InvalidConfigError, match=message):
        SparsityConfig(**bad)
