"""The option objects and the one table of quantize keywords / CLI flags."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from llmquant.cli.quantize_cmd import register
from llmquant.config.flags import FLAGS_BY_NAME, OPTION_CLASSES, QUANTIZE_FLAGS, RECIPE, build_recipe, split_keywords
from llmquant.config.options import LoadOptions, RunOptions, VerifyOptions
from llmquant.config.overrides import GPTQ_FIELDS
from llmquant.config.recipe import GPTQConfig
from llmquant.errors import InvalidConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmquant")
    register(parser.add_subparsers())
    return parser


@pytest.mark.parametrize("make, message", [
    (lambda: LoadOptions(dtype="fp8"), "dtype must be one of auto, float32, bfloat16, float16; got 'fp8'"),
    (lambda: LoadOptions(trust_remote_code="yes"), 'load.trust_remote_code must be true or false; got the string "yes"'),
    (lambda: LoadOptions.from_dict({"revison": "main"}), "Unknown key(s) 'revison' in load; valid keys: allow_pickle"),
    (lambda: VerifyOptions(verify_tokens="2k"), 'verification.verify_tokens must be an integer; got the string "2k"'),
    (lambda: VerifyOptions(verify_tokens=0), "verify_tokens must be a positive number of tokens"),
    (lambda: RunOptions(output=3), "run.output must be a string or PathLike or null; got the integer 3"),
    (lambda: RunOptions(push_to_hub="me/model"), "push_to_hub needs an output folder"),
    (lambda: RunOptions.from_dict({"output": "x", "ovewrite": True}), "Unknown key(s) 'ovewrite' in run"),
])
def test_option_objects_reject_unknown_keys_and_wrong_types(make, message):
    with pytest.raises(InvalidConfigError) as e:
        make()
    assert message in str(e.value)


def test_option_objects_accept_what_load_model_accepts():
    assert LoadOptions(dtype=torch.float32, device=torch.device("cpu")).kwargs()["dtype"] is torch.float32
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoadOptions().dtype = "float32"


def test_every_option_field_is_a_keyword_and_every_keyword_fills_a_field():
    for kind, cls in OPTION_CLASSES.items():
        assert {f.name for f in dataclasses.fields(cls)} == {f.name for f in QUANTIZE_FLAGS if f.into == kind}
    for flag in QUANTIZE_FLAGS:
        if flag.into == RECIPE and flag.name not in ("scheme", "recipe"):
            assert (flag.path is None) != (flag.apply is None), flag.name  # one way to change the recipe
    # every GPTQ setting has its keyword, and each of those keywords is a row of the table
    assert set(GPTQ_FIELDS.values()) == {f.name for f in dataclasses.fields(GPTQConfig)}
    assert set(GPTQ_FIELDS) <= set(FLAGS_BY_NAME)


def test_the_cli_parser_is_the_table():
    """Every flag's dest is a keyword of quantize() (same name), and defaults are the objects' defaults."""
    args = _parser().parse_args(["quantize"])
    dests = set(vars(args)) - {"handler", "model", "quiet"}
    assert dests == set(FLAGS_BY_NAME) - {"progress"}
    given = split_keywords({k: getattr(args, k) for k in dests})
    assert LoadOptions(**given["load"]) == LoadOptions()
    assert VerifyOptions(**given["verification"]) == VerifyOptions()
    assert RunOptions(**given["run"]) == RunOptions()
    assert all(v is None for v in given[RECIPE].values())  # recipe flags: "not given"


def test_flags_and_keywords_build_the_same_recipe():
    argv = ["quantize", "--scheme", "w8a8", "--activations", "static", "--observer", "percentile",
            "--percentile", "99.9", "--ignore", "lm_head", "re:.*down_proj", "--no-smoothquant",
            "--gptq-refit-rounds", "2", "--no-act-order", "--num-samples", "16", "--seq-len", "64"]
    args = _parser().parse_args(argv)
    from_cli = build_recipe(**split_keywords({f.name: getattr(args, f.name) for f in QUANTIZE_FLAGS
                                              if f.name != "progress"})[RECIPE])
    from_python = build_recipe(scheme="W8A8", activations="static", observer="percentile", percentile=99.9,
                               ignore=["lm_head", "re:.*down_proj"], smoothquant=False, gptq_refit_rounds=2,
                               act_order=False, num_samples=16, seq_len=64)
    assert from_cli == from_python
    acts = from_python.scheme.input_activations
    assert (acts.observer, acts.percentile, acts.dynamic) == ("percentile", 99.9, False)
    assert from_python.gptq == GPTQConfig(refit_rounds=2, act_order=False) and from_python.smoothquant is None
    assert from_python.calibration.num_samples == 16


def test_a_single_ignore_pattern_is_one_pattern():
    assert build_recipe(scheme="W8A16", ignore="lm_head").ignore == ("lm_head",)


def test_group_size_adapts_only_when_nobody_chose_it():
    assert build_recipe(scheme="W4A16").adapt_group_size
    assert build_recipe(scheme="W4A16", num_samples=8).adapt_group_size
    assert not build_recipe(scheme="W4A16", group_size=128).adapt_group_size
    assert not build_recipe(recipe=build_recipe(scheme="W4A16", group_size=64)).adapt_group_size


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(num_sample=4), "Unknown key(s) 'num_sample' in the arguments of quantize(); valid keys:"),
    (dict(scheme="W4A16", gptq=False, gptq_block_size=64), "GPTQ options (gptq_block_size) were given with GPTQ "
                                                             "turned off (--no-gptq or gptq=False)"),
    (dict(scheme="W4A16", activation_observer="percentile"), "W8A8/FP8/FP8_DYNAMIC"),
    (dict(scheme="W4A16", activations="static"), "apply to schemes that quantize activations"),
    (dict(recipe="w8a8"), "'w8a8' is a scheme name, not a recipe file: pass scheme='w8a8'"),
])
def test_keyword_mistakes_are_refused_by_name(kwargs, phrase):
    with pytest.raises(InvalidConfigError) as e:
        given = split_keywords(kwargs)
        build_recipe(**given[RECIPE])
    assert phrase in str(e.value)


def test_quantize_refuses_a_bad_keyword_before_loading_anything(tmp_path):
    from llmquant import quantize

    with pytest.raises(InvalidConfigError, match="'verfy'.*valid keys:.*verify"):
        quantize(tmp_path / "no-such-model", verfy=False)
    with pytest.raises(InvalidConfigError, match="load must be a LoadOptions"):
        quantize(tmp_path / "no-such-model", load={"dtype": "float32"})
