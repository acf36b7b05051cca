"""Layer plans: automatic group size, and the error or fallback for widths a group does not divide."""

import pytest
from torch import nn

from llmquant.errors import InvalidConfigError
from llmquant.quant.pipeline.plan import auto_group_size, config_groups, plan_layers, unquantized_linear_names
from llmquant.config.recipe import recipe_from_scheme
from llmquant.quant.pipeline.targets import best_group, linear_layers


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(576, 1536)      # 576 = 9 x 64: not a multiple of 128
        self.down = nn.Linear(1536, 576)    # 1536 = 12 x 128
        self.lm_head = nn.Linear(576, 100)


def _layers(model, recipe):
    return list(linear_layers(model, recipe.targets, recipe.ignore))


def test_auto_group_size_picks_the_largest_that_fits():
    recipe = recipe_from_scheme("W4A16")
    new, message = auto_group_size(recipe, _layers(Block(), recipe))
    assert new.scheme.weights.group_size == 64
    assert "576" in message and "--group-size" in message


def test_explicit_group_size_that_does_not_divide_is_an_error_naming_the_layer():
    recipe = recipe_from_scheme("W4A16", weights={"group_size": 128})
    with pytest.raises(InvalidConfigError) as e:
        plan_layers(recipe, _layers(Block(), recipe))
    message = str(e.value)
    assert "up (width 576)" in message and "--group-size-fallback" in message
    assert "down" not in message.replace("down the", "")


def test_channel_fallback_and_its_config_group():
    model = Block()
    recipe = recipe_from_scheme("W4A16", weights={"group_size": 128}).with_overrides(group_size_fallback="channel")
    plans = plan_layers(recipe, _layers(model, recipe))
    by_name = {p.name: p for p in plans}
    assert by_name["up"].scheme.weights.strategy == "channel"
    assert by_name["down"].scheme.weights.group_size == 128
    groups = config_groups(recipe, plans)
    assert groups[1][1] == ["up"]
    # An exact name outranks the class target, as in vLLM and compressed-tensors.
    assert best_group("up", model.up, [g[1] for g in groups]) == 1
    assert best_group("down", model.down, [g[1] for g in groups]) == 0


def test_skip_fallback_keeps_the_layer_in_full_precision_and_lists_it_in_ignore():
    model = Block()
    recipe = recipe_from_scheme("W4A16", weights={"group_size": 128}).with_overrides(group_size_fallback="skip")
    plans = plan_layers(recipe, _layers(model, recipe))
    assert [p.name for p in plans if p.scheme is None] == ["up"]
    assert unquantized_linear_names(model, plans) == ["up", "lm_head"]


def test_targets_and_ignore_patterns():
    model = Block()
    recipe = recipe_from_scheme("W8A16").with_overrides(targets=("re:.*own$",), ignore=())
    assert [n for n, _ in linear_layers(model, recipe.targets, recipe.ignore)] == ["down"]
    recipe = recipe_from_scheme("W8A16").with_overrides(ignore=("lm_head", "re:u.*"))
    assert [n for n, _ in linear_layers(model, recipe.targets, recipe.ignore)] == ["down"]
