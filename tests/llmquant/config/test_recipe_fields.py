"""Every field of every recipe section is type-checked, and the message names the field, the
type expected and the valid values. The cases are generated from the recipes' own fields, so a
field added later is covered without touching this file."""

from __future__ import annotations

import dataclasses

import pytest

from llmquant.config.args import QuantArgs
from llmquant.config.recipe import (AWQConfig, CalibrationConfig, GPTQConfig, MixedPrecisionConfig, Recipe,
                                    SmoothQuantConfig)
from llmquant.errors import InvalidConfigError

# Two recipes that between them set every section: weight-only with AWQ, GPTQ and mixed precision;
# static W8A8 with SmoothQuant and GPTQ.
FULL = {
    "weight-only": {"quantize": {"scheme": "W4A16"}, "awq": {"grid": 10}, "gptq": {},
                    "mixed_precision": {"target_bits": 5.0}, "calibration": {"config_name": "wikitext"}},
    "activations": {"quantize": {"scheme": "W8A8", "input_activations": {"dynamic": False, "strategy": "tensor"}},
                    "smoothquant": {"alpha": 0.5}, "gptq": {}},
}
SECTION_CLASSES = {"calibration": CalibrationConfig, "smoothquant": SmoothQuantConfig, "gptq": GPTQConfig,
                   "awq": AWQConfig, "mixed_precision": MixedPrecisionConfig, "quantize.weights": QuantArgs,
                   "quantize.input_activations": QuantArgs}


def _leaves(data: dict, prefix: str = ""):
    """(path, value) of every field of a recipe dict; the scheme's weight/activation args are
    sections of their own."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")
        elif prefix and path not in SECTION_CLASSES:  # None sections are absent, not fields
            yield path, value


def _wrong(value):
    """A value of another type than `value` (and than anything the field takes)."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return "many"
    if isinstance(value, str):
        return 12345
    return [1, 2]  # None (an unset optional scalar) and lists of patterns (a list of numbers is wrong too)


def _full_dicts() -> dict[str, dict]:
    return {name: Recipe.from_dict(data).to_dict() for name, data in FULL.items()}


CASES = sorted({path: (name, value) for name, d in _full_dicts().items() for path, value in _leaves(d)}.items())


def _with(data: dict, path: str, value) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    *parents, key = path.split(".")
    node = out
    for p in parents:
        node[p] = dict(node[p])
        node = node[p]
    node[key] = value
    return out


def test_the_cases_cover_every_field_of_every_section():
    paths = {path for path, _ in CASES}
    for section, cls in SECTION_CLASSES.items():
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name}" in paths, f"{section}.{f.name} has no wrong-type case"
    for key in ("scheme", "targets", "ignore", "group_size_fallback"):
        assert f"quantize.{key}" in paths


@pytest.mark.parametrize("path, case", CASES, ids=[path for path, _ in CASES])
@pytest.mark.parametrize("kind", ["other type", "mapping"])
def test_a_wrong_type_in_any_field_is_refused_by_name(path, case, kind):
    name, value = case
    bad = _wrong(value) if kind == "other type" else {"x": 1}
    with pytest.raises(InvalidConfigError) as e:
        Recipe.from_dict(_with(_full_dicts()[name], path, bad))
    message = str(e.value)
    assert f"{path} must be" in message, message
    assert "got " in message  # and what was given instead


@pytest.mark.parametrize("section", ["quantize", "calibration", "smoothquant", "gptq", "awq", "mixed_precision",
                                     "quantize.weights", "quantize.input_activations"])
def test_a_section_that_is_not_a_mapping_is_refused_by_name(section):
    data = _with(_full_dicts()["activations" if section in ("smoothquant", "quantize.input_activations")
                               else "weight-only"], section, [1, 2])
    with pytest.raises(InvalidConfigError, match=rf"^{section} must be a mapping.*got the list \[1, 2\]"):
        Recipe.from_dict(data)


@pytest.mark.parametrize("text, message", [
    ('quantize: {scheme: W8A16, weights: {num_bits: "4"}}',
     'quantize.weights.num_bits must be an integer, one of 4, 8; got the string "4".'),
    ("quantize: [1, 2]", "quantize must be a mapping such as {scheme: W4A16}; got the list [1, 2]."),
    ("quantize: {scheme: W4A16}\ncalibration: {num_samples: many}",
     'calibration.num_samples must be an integer; got the string "many".'),
    ("quantize: {scheme: W4A16, group_size_fallback: 3}",
     "quantize.group_size_fallback must be a string, one of error, channel, skip; got the integer 3."),
    ("quantize: {scheme: 4}", "quantize.scheme must be a string or null, one of W8A16, W4A16"),
    ("quantize: {scheme: W4A16}\ngptq: {act_order: maybe}", 'gptq.act_order must be true or false; got the string'),
    ("quantize: {scheme: W8A8}\nsmoothquant: {alpha: [0.5]}",
     "smoothquant.alpha must be 'auto' or a number from 0 to 1; got the list [0.5]."),
])
def test_messages_name_the_field_the_type_and_the_valid_values(text, message):
    with pytest.raises(InvalidConfigError) as e:
        Recipe.from_yaml(text)
    assert message in str(e.value)


def test_one_pattern_may_be_a_plain_string():
    r = Recipe.from_yaml("quantize: {scheme: W8A16, ignore: lm_head, targets: Linear}")
    assert r.ignore == ("lm_head",) and r.targets == ("Linear",)
    assert Recipe.from_dict(r.to_dict()) == r and r.to_dict()["quantize"]["ignore"] == ["lm_head"]


def test_python_objects_are_checked_too():
    with pytest.raises(InvalidConfigError, match=r"^calibration.seq_len must be an integer; got the number 5.5"):
        CalibrationConfig(seq_len=5.5)
    with pytest.raises(InvalidConfigError, match="QuantArgs.symmetric must be true or false"):
        QuantArgs(symmetric=1)
    assert Recipe(scheme=Recipe.from_yaml("quantize: {scheme: W8A16}").scheme, ignore=["lm_head"]).ignore == ("lm_head",)
