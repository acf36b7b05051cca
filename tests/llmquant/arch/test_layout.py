"""Names on disk versus in memory: Mixtral's experts are `block_sparse_moe` in its checkpoints and
`mlp` in transformers 5; every name llmquant writes (tensors, config groups, ignore lists) is the
checkpoint's, and every pattern a user gives matches either spelling."""

from __future__ import annotations

from torch import nn

from llmquant.arch.registry import from_checkpoint_name, spec_for, to_checkpoint_name
from llmquant.config.args import QuantScheme
from llmquant.quant.pipeline.plan import LayerPlan, config_groups
from llmquant.config.presets import preset
from llmquant.config.recipe import recipe_from_scheme
from llmquant.quant.pipeline.targets import linear_layers


def test_names_round_trip_between_memory_and_checkpoint():
    spec = spec_for("mixtral")
    memory = "model.layers.3.mlp.experts.7.w1.weight_packed"
    assert to_checkpoint_name(memory, spec) == "model.layers.3.block_sparse_moe.experts.7.w1.weight_packed"
    assert from_checkpoint_name(to_checkpoint_name(memory, spec), spec) == memory
    assert to_checkpoint_name(memory, spec_for("qwen3_moe")) == memory  # same names on disk


def test_mixed_precision_groups_name_layers_as_the_checkpoint_does():
    recipe = recipe_from_scheme("W4A16")
    high: QuantScheme = preset("W8A16")
    plans = [LayerPlan("model.layers.0.mlp.experts.1.w2", nn.Linear(4, 4), high),
             LayerPlan("model.layers.0.self_attn.q_proj", nn.Linear(4, 4), recipe.scheme)]
    groups = config_groups(recipe, plans, spec_for("mixtral"))
    assert groups[0] == (recipe.scheme, ["Linear"])
    assert groups[1] == (high, ["model.layers.0.block_sparse_moe.experts.1.w2"])


def test_ignore_patterns_match_either_spelling(architecture_dir):
    from transformers import AutoModelForCausalLM

    from llmquant.arch.experts import linearize
    from llmquant.arch.registry import model_spec

    model = AutoModelForCausalLM.from_pretrained(architecture_dir("mixtral"))
    linearize(model, model_spec(model).experts)
    every = {n for n, _ in linear_layers(model, ["Linear"], [])}
    for pattern in ("re:.*block_sparse_moe\\.experts\\..*", "re:.*mlp\\.experts\\..*"):
        kept = {n for n, _ in linear_layers(model, ["Linear"], [pattern])}
        assert kept == {n for n in every if ".experts." not in n}
    exact = "model.layers.1.block_sparse_moe.experts.2.w3"
    assert "model.layers.1.mlp.experts.2.w3" not in {n for n, _ in linear_layers(model, ["Linear"], [exact])}
