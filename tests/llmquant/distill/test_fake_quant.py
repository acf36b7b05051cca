"""Quantization-aware training: the fake-quantized forward is what the exported checkpoint
computes, gradients pass straight through, and `llmquant.distill` QAT output loads in our runtime."""

from __future__ import annotations

import copy

import pytest
import torch

from llmquant.distill.fake_quant import FakeQuantLinear, apply_fake_quant, remove_fake_quant
from llmquant.config.presets import preset


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


@pytest.mark.parametrize("scheme, group", [("W4A16", 64), ("W8A8", None)])
def test_fake_quant_forward_equals_the_exported_quantized_model(teacher, windows, scheme, group):
    from llmquant.loading import LoadedModel
    from llmquant.quant.pipeline.quantize import quantize

    model = copy.deepcopy(teacher.model)
    ids = windows[:2]
    float_logits = _logits(model, ids)
    s = preset(scheme)
    if group:
        s = s.replace(weights=s.weights.__class__(**{**s.weights.to_dict(), "group_size": group}))
    names = apply_fake_quant(model, s, scale_dtype=torch.bfloat16)
    assert len(names) == 4 * 7 and isinstance(model.model.layers[0].mlp.up_proj, FakeQuantLinear)
    fq_logits = _logits(model, ids)
    remove_fake_quant(model)
    loaded = LoadedModel(model=model, tokenizer=teacher.tokenizer, source=teacher.source,
                         source_dtype=torch.bfloat16, quantization_config=None)
    q = quantize(loaded, scheme=scheme, group_size=group, observer="minmax", smoothquant=False, verify=False,
                 progress=False)
    q_logits = _logits(q.model, ids)
    quant_error = (float_logits - q_logits).abs().mean().item()
    match_error = (fq_logits - q_logits).abs().mean().item()
    assert quant_error > 1e-3  # quantization is visible in the logits...
    assert match_error < 0.05 * quant_error  # ...and QAT trained against that very grid


def test_straight_through_gradient():
    layer = torch.nn.Linear(64, 8, bias=False)
    FakeQuantLinear.wrap(layer, preset("W4A16").replace(
        weights=preset("W4A16").weights.__class__(num_bits=4, strategy="group", group_size=32)), torch.float32)
    x = torch.randn(5, 64)
    layer(x).sum().backward()
    # d(sum(x @ W_q^T))/dW = sum over rows of x, for every output row: the rounding is skipped.
    assert torch.allclose(layer.weight.grad, x.sum(0).expand(8, 64), atol=1e-5)


def test_distill_with_qat_saves_a_checkpoint_our_runtime_loads(teacher_dir, tmp_path):
    import llmquant
    from llmquant.quant.linear import QuantizedLinear

    result = llmquant.distill(teacher_dir, output=tmp_path / "s", keep_layers=[0, 2], steps=2, batch_size=2,
                              seq_len=64, teacher_mode="offline", top_k=8, qat_scheme="W4A16", qat_group_size=64,
                              dtype="float32", progress=False)
    assert result.quantization["scheme"].startswith("w int4 group64")
    assert result.quantization["verification"]["kl_mean"] < 0.05
    loaded = llmquant.load_model(tmp_path / "s", dtype="float32")
    assert loaded.quantization_config["quant_method"] == "compressed-tensors"
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 2 * 7 and loaded.model.config.num_hidden_layers == 2
    logits = _logits(loaded.model, torch.tensor([[5, 6, 7, 8]]))
    assert torch.isfinite(logits).all()
    assert {"distill_recipe.yaml", "distill_report.json", "recipe.yaml"} <= {p.name for p in (tmp_path / "s").iterdir()}
