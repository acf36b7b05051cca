"""SmoothQuant: a function-preserving rescaling that flattens activation outliers."""

import pytest
import torch
from torch import nn

from llmquant.errors import InvalidConfigError
from llmquant.config.recipe import Recipe
from llmquant.quant.algorithms.smoothquant import apply_smoothing, find_mappings, Mapping, smooth_model, smoothing_scales


def test_scales_by_hand():
    act = torch.tensor([16.0, 1.0, 0.0])
    w = torch.tensor([1.0, 4.0, 2.0])
    s = smoothing_scales(act, w, alpha=0.5)
    assert torch.allclose(s, torch.tensor([4.0, 0.5, 1.0]))  # sqrt(16)/sqrt(1), sqrt(1)/sqrt(4), unused -> 1
    assert torch.allclose(smoothing_scales(act, w, alpha=0.0)[:2], 1 / w[:2])


@pytest.fixture()
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # give two hidden channels outliers, as real models have
        model.model.embed_tokens.weight[:, 3] *= 30.0
        model.model.embed_tokens.weight[:, 77] *= 20.0
    return model


def test_mappings_of_a_llama_layer(tiny):
    maps = {m.smooth: m.balance for m in find_mappings(tiny)}
    assert maps["model.layers.0.input_layernorm"] == ["model.layers.0.self_attn.q_proj",
                                                       "model.layers.0.self_attn.k_proj",
                                                       "model.layers.0.self_attn.v_proj"]
    assert maps["model.layers.1.post_attention_layernorm"] == ["model.layers.1.mlp.gate_proj",
                                                                "model.layers.1.mlp.up_proj"]
    assert maps["model.layers.1.mlp.up_proj"] == ["model.layers.1.mlp.down_proj"]
    assert len(maps) == 6


def test_smoothing_preserves_the_function_and_flattens_activations(tiny):
    ids = torch.randint(0, tiny.config.vocab_size, (4, 32))
    q_proj = tiny.model.layers[0].self_attn.q_proj
    seen = {}
    hook = q_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].detach().clone()))
    with torch.no_grad():
        before = tiny(ids).logits
        x_before = seen["x"]
        result = smooth_model(tiny, ids, alpha=0.5, progress=False)
        after = tiny(ids).logits
        x_after = seen["x"]
    hook.remove()
    assert len(result.applied) == 6 and not result.skipped
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)

    def spread(x):  # largest channel range over the median channel range
        per_channel = x.abs().reshape(-1, x.shape[-1]).amax(0)
        return (per_channel.max() / per_channel.median()).item()

    # alpha 0.5 leaves about the square root of the original spread (7.8 -> 2.6 here)
    assert spread(x_after) < spread(x_before) / 2


class OnePlusNorm(nn.Module):
    """A norm computing (1 + w) * x, as Gemma's: dividing w does not divide the output."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x * (1.0 + self.weight)


def test_a_norm_whose_output_does_not_scale_is_left_alone():
    model = nn.Module()
    model.norm = OnePlusNorm(8)
    model.lin = nn.Linear(8, 4)
    w_before = model.lin.weight.detach().clone()
    why = apply_smoothing(model, Mapping("norm", ["lin"]), torch.full((8,), 2.0))
    assert "does not scale" in why
    assert torch.equal(model.norm.weight, torch.zeros(8)) and torch.equal(model.lin.weight, w_before)


def test_recipe_section():
    r = Recipe.from_yaml("quantize: {scheme: W8A8}\nsmoothquant: {alpha: 0.8}")
    assert r.smoothquant.alpha == 0.8 and Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(InvalidConfigError, match="only hurts weight-only"):
        Recipe.from_yaml("quantize: {scheme: W4A16}\nsmoothquant: {alpha: 0.5}")
    with pytest.raises(InvalidConfigError, match="between 0 and 1"):
        Recipe.from_yaml("quantize: {scheme: W8A8}\nsmoothquant: {alpha: 1.5}")
    with pytest.raises(InvalidConfigError, match="'strength'"):
        Recipe.from_yaml("quantize: {scheme: W8A8}\nsmoothquant: {strength: 0.5}")


def test_w8a8_runs_smoothquant_unless_told_not_to():
    from llmquant.quant.pipeline.quantize import build_recipe

    assert build_recipe(scheme="W8A8").smoothquant.alpha == "auto"
    assert build_recipe(scheme="W8A8", smoothquant=False).smoothquant is None
    assert build_recipe(scheme="W8A8", smoothquant=0.6).smoothquant.alpha == 0.6
    assert build_recipe(scheme="FP8_DYNAMIC").smoothquant.alpha == "auto"
    assert build_recipe(scheme="FP8").smoothquant is None
    assert Recipe.from_yaml("quantize: {scheme: W8A8}").smoothquant.alpha == "auto"  # absent: the default
    assert Recipe.from_yaml("quantize: {scheme: W8A8}\nsmoothquant: null").smoothquant is None
    assert build_recipe(scheme="W8A8", activations="static").smoothquant.alpha == "auto"


def test_an_up_projection_folds_in_bf16():
    """A Linear producing the activation scales exactly with its rows: no probe check, which bf16
    matmul rounding used to fail (so up -> down was never smoothed on bf16 models)."""
    torch.manual_seed(0)
    mlp = nn.Module()
    mlp.up_proj, mlp.down_proj = nn.Linear(64, 128, bias=False), nn.Linear(128, 64, bias=False)
    mlp.to(torch.bfloat16)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    before = mlp.down_proj(mlp.up_proj(x)).float()
    scales = 0.5 + torch.rand(128)
    assert apply_smoothing(mlp, Mapping("up_proj", ["down_proj"]), scales) is None
    after = mlp.down_proj(mlp.up_proj(x)).float()
    assert torch.nn.functional.cosine_similarity(before.flatten(), after.flatten(), dim=0) > 0.999
