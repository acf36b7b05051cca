"""SmoothQuant / AWQ mappings from the architecture registry: folding any scales into them leaves
the model's function unchanged, on every architecture; a norm that does not feed a layer is refused."""

from __future__ import annotations

import pytest
import torch

from llmquant.arch.experts import linearize
from llmquant.arch.mappings import check_readers, find_mappings
from llmquant.arch.registry import DEFAULT, model_spec
from llmquant.quant.algorithms.smoothquant import apply_smoothing

MATRIX = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "mixtral", "qwen3_moe",
          "gpt_oss", "deepseek_v3", "qwen2_moe", "olmoe")


def _model(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    linearize(model, model_spec(model).experts)
    return model


@pytest.mark.parametrize("arch", MATRIX)
def test_folding_random_scales_preserves_the_function(arch, architecture_dir):
    model = _model(architecture_dir(arch))
    ids = torch.randint(0, 500, (1, 48), generator=torch.Generator().manual_seed(0))
    mappings = find_mappings(model)
    rejected = check_readers(model, mappings, ids)
    assert not rejected
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        before = model(ids).logits
    applied = 0
    for mp in mappings:
        width = (mp.rows[1] - mp.rows[0]) if mp.rows else model.get_submodule(mp.smooth).weight.shape[0]
        applied += apply_smoothing(model, mp, 0.5 + 1.5 * torch.rand(width, generator=g)) is None
    with torch.inference_mode():
        after = model(ids).logits
    assert applied >= (2 if "gemma" in arch else len(mappings))  # Gemma's (1 + w) norms are refused
    torch.testing.assert_close(after, before, atol=2e-4, rtol=2e-4)


def test_moe_mapping_scales_routers_with_every_experts_inputs(architecture_dir):
    model = _model(architecture_dir("mixtral"))
    mlp = [m for m in find_mappings(model) if m.smooth == "model.layers.0.post_attention_layernorm"][0]
    assert mlp.co_scaled == ["model.layers.0.mlp.gate"]
    assert {b.rsplit(".", 2)[-2:][1] for b in mlp.balance} == {"w1", "w3"} and len(mlp.balance) == 8
    assert mlp.readers == ["model.layers.0.mlp"]


def test_a_norm_that_feeds_no_layer_is_refused(architecture_dir):
    """OLMo 2 normalizes outputs: with Llama's facts (the default spec) the reader check refuses every
    norm mapping rather than fold scales where they would change the model."""
    model = _model(architecture_dir("olmo2"))
    wrong = [m for m in find_mappings(model, DEFAULT) if m.smooth.endswith("layernorm")]
    assert wrong
    rejected = check_readers(model, wrong, torch.randint(0, 500, (1, 16)))
    assert set(rejected) == {m.smooth for m in wrong}
    assert all("does not read" in why for why in rejected.values())
