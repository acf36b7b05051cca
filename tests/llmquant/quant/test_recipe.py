"""Recipes: YAML and Python objects are the same thing; bad input is rejected by name."""

from pathlib import Path

import pytest

from llmquant.errors import InvalidConfigError
from llmquant.quant.pipeline.quantize import build_recipe
from llmquant.config.recipe import Recipe

CONFIGS = sorted((Path(__file__).parents[3] / "configs" / "quant").glob("*.yaml"))


def test_every_shipped_recipe_exists_per_scheme():
    names = {Recipe.load(p).scheme_name for p in CONFIGS}
    assert {"W8A16", "W4A16", "W4A16_ASYM", "W8A8", "FP8", "FP8_DYNAMIC", "FP8_W"} <= names
    assert any(Recipe.load(p).scheme.weights.observer == "percentile" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_round_trip(path):
    recipe = Recipe.load(path)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_overrides_apply_on_top_of_the_preset():
    r = Recipe.from_yaml("quantize: {scheme: w4a16, weights: {group_size: 32, symmetric: false}}")
    assert r.scheme_name == "W4A16"
    assert (r.scheme.weights.group_size, r.scheme.weights.symmetric, r.scheme.weights.num_bits) == (32, False, 4)


@pytest.mark.parametrize("text, phrase", [
    ("quantize: {scheme: W4A16, wieghts: {}}", "'wieghts'"),
    ("quantize: {scheme: W4A16, weights: {group: 64}}", "valid keys: dynamic, group_size"),
    ("quantize: {scheme: W3A16}", "valid schemes: W8A16, W4A16"),
    ("quantize: {scheme: W4A16, weights: {group_size: 60}}", "multiple of 8"),
    ("quantize: {scheme: W8A16, weights: {num_bits: 3}}", "4 or 8 bits"),
    ("quantize: {scheme: FP8, weights: {symmetric: false}}", "symmetric"),
    ("quantize: {scheme: W8A8, input_activations: {observer: percentile}}", "Dynamic activations"),
    ("quantize: {scheme: W8A8, input_activations: {dynamic: false}}", "per tensor"),
    ("quantize: {scheme: W4A16, group_size_fallback: maybe}", "error, channel, skip"),
    ("quantize: {scheme: W4A16}\ncalibration: {samples: 3}", "'samples'"),
    ("quantize: {scheme: W4A16, ignore: ['re:(']}", "Invalid regular expression"),
    ("quantize: [1, 2", "not valid YAML"),
    ("quantize: {scheme: W4A16}\ncalibration: {moe_calibration: some}", "must be one of routed, all"),
    ("quantize: {scheme: W4A16}\ncalibration: {min_expert_tokens: 0}", "at least 1"),
    ("quantize: {scheme: W4A16}\ncalibration: {num_samples: many}", "calibration.num_samples must be an integer"),
])
def test_invalid_recipes_name_the_problem(text, phrase):
    with pytest.raises(InvalidConfigError, match=None) as e:
        Recipe.from_yaml(text)
    assert phrase in str(e.value)


def test_flag_overrides_match_the_cli_semantics():
    r = build_recipe(scheme="FP8", observer="percentile", percentile=99.9)
    assert r.scheme.weights.observer == "percentile"
    assert r.scheme.input_activations.observer == "percentile"
    assert r.scheme.input_activations.percentile == 99.9
    r = build_recipe(scheme="W8A8", activations="static", observer="mse")
    assert r.scheme.input_activations.strategy == "tensor" and not r.scheme.input_activations.dynamic
    assert r.scheme.weights.observer == "mse" and r.scheme.input_activations.observer == "minmax"
    with pytest.raises(InvalidConfigError, match="W8A8/FP8/FP8_DYNAMIC"):
        build_recipe(scheme="W4A16", activation_observer="percentile")
    with pytest.raises(InvalidConfigError, match="either a recipe or a scheme"):
        build_recipe(scheme="W4A16", recipe=CONFIGS[0])
