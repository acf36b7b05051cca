"""Algorithms are registered steps run in recipe order, and the report says what data each
pass of the run used."""

from __future__ import annotations

import json

from llmquant import quantize
from llmquant.config.recipe import (AWQConfig, GPTQConfig, MixedPrecisionConfig, Recipe,
                                    RoundingConfig, SmoothQuantConfig)
from llmquant.quant.pipeline.steps import registered_steps


def test_every_recipe_step_has_a_handler_and_they_run_in_order():
    assert set(registered_steps()) >= {MixedPrecisionConfig, SmoothQuantConfig, AWQConfig, GPTQConfig, RoundingConfig}
    r = Recipe.from_yaml("quantize: {scheme: W4A16}\nawq: {grid: 4}\ngptq: {}\nmixed_precision: {target_bits: 5}")
    assert [type(c) for c in r.steps()] == [MixedPrecisionConfig, AWQConfig, GPTQConfig, RoundingConfig]
    assert [type(c) for c in Recipe.from_yaml("quantize: {scheme: W8A8}").steps()] == [SmoothQuantConfig,
                                                                                       RoundingConfig]


def test_the_report_states_what_each_pass_used(tiny_model_dir, tmp_path):
    """FP8_DYNAMIC: SmoothQuant reads every calibration sample, the activation report only the first
    few; both are in the report's text and JSON, with the held-out verification."""
    result = quantize(tiny_model_dir, scheme="FP8_DYNAMIC", num_samples=12, seq_len=64, verify_tokens=256,
                      output=tmp_path / "q", progress=False, dtype="float32")
    data = json.loads((tmp_path / "q" / "quantization_report.json").read_text())
    passes = {p["step"]: p for p in data["data_passes"]}
    assert list(passes) == ["smoothquant", "activation_report", "verification"]
    assert (passes["smoothquant"]["samples"], passes["smoothquant"]["seq_len"], passes["smoothquant"]["tokens"]) == \
        (12, 64, 768)
    assert passes["activation_report"]["samples"] == 8 and passes["activation_report"]["split"] == "calibration"
    assert passes["verification"]["split"] == "held-out" and passes["verification"]["tokens"] == 256
    assert data["calibration"]["num_samples"] == 12
    assert data["calibration"]["description"].startswith("12 x 64 tokens from builtin (calibration split, seed 0) "
                                                          "for SmoothQuant")
    text = (tmp_path / "q" / "quantization_report.md").read_text()
    assert "  - SmoothQuant (alpha auto) activation statistics: 12 x 64 tokens (768) from builtin" in text
    assert "  - the activation report (dynamic scales need no data): 8 x 64 tokens (512)" in text
    assert "  - verification against the original model: 1 x 256 tokens (256) from builtin (held-out split)" in text
    assert "data: SmoothQuant 12 x 64; activation report 8 x 64; verification 1 x 256 held-out" in \
        result.report.summary_lines()
    assert data["timings_s"]["smoothquant"] > 0 and data["timings_s"]["rounding"] > 0
