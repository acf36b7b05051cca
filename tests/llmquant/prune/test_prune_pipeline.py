"""Pruning through `llmquant prune` and `llmquant quantize --prune`, on tiny models of several
architectures: the pattern survives rounding and saving, the folder loads in transformers and in
our runtime with the same logits, and every targeted layer is pruned."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import llmquant
from llmquant.config.recipe import Recipe
from llmquant.errors import InvalidConfigError, OutputExistsError
from llmquant.prune.masks import follows_n_of_m
from llmquant.quant.linear import QuantizedLinear

QUANT = dict(num_samples=8, seq_len=64, verify_tokens=256, progress=False)
ARCHS = ["llama", "qwen2", "gemma2", "phi3", "mixtral", "qwen3_moe", "deepseek_v3"]


def _ids(vocab: int = 500) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.float().flatten()


def _cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def _quantized_weights(model):
    return {n: m.dequantized_weight() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("arch", ARCHS)
def test_sparsegpt_24_inside_gptq_survives_saving_on_every_architecture(arch, architecture_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    source = architecture_dir(arch)
    out = tmp_path / "q"
    result = llmquant.quantize(source, scheme="W4A16", group_size=16, gptq=True, prune="sparsegpt",
                               sparsity_pattern="2:4", output=out, **QUANT)
    assert result.report.sparsity["layers"] == len(result.report.layers) > 0
    assert all(r.sparsity >= 0.5 for r in result.report.layers)
    reloaded = llmquant.load_model(out, dtype="float32").model
    weights = _quantized_weights(reloaded)
    assert len(weights) == len(result.report.layers)  # every targeted layer (experts too) was pruned
    for name, w in weights.items():
        assert follows_n_of_m(w != 0, 2, 4), name
    config = json.loads((out / "config.json").read_text())
    # Declaring 2:4 in config.json makes vLLM >= 0.19 refuse the folder; the zeros are stored densely.
    assert "sparsity_config" not in config["quantization_config"]
    assert "sparsity:" in (out / "recipe.yaml").read_text()
    if arch not in ("gpt_oss",):
        theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert _cosine(_logits(theirs, _ids()), _logits(reloaded, _ids())) >= 0.999


def test_pruning_then_rounding_keeps_zeros_on_every_grid(tiny_model_dir, tmp_path):
    for scheme, extra in [("W4A16_ASYM", dict(group_size=32)), ("W8A8", dict(smoothquant=False)),
                          ("FP8_DYNAMIC", dict(smoothquant=False))]:
        r = llmquant.quantize(tiny_model_dir, scheme=scheme, prune="wanda", sparsity=0.5,
                              output=tmp_path / scheme, **extra, **QUANT)
        for name, w in _quantized_weights(llmquant.load_model(tmp_path / scheme).model).items():
            assert (w == 0).float().mean() >= 0.5, (scheme, name)
        assert r.report.sparsity["method"] == "wanda" and r.report.sparsity["measured"] >= 0.5
        assert all("pruning alone: output SQNR" in (layer.note or "") for layer in r.report.layers)
        assert "sparsity: wanda 50% unstructured" in (tmp_path / scheme / "quantization_report.md").read_text()


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_prune_saves_a_dense_checkpoint_that_loads_everywhere(arch, architecture_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    source = architecture_dir(arch)
    out = tmp_path / "pruned"
    result = llmquant.prune(source, out, method="sparsegpt", sparsity=0.5,
                            calibration=llmquant.CalibrationConfig(num_samples=8, seq_len=64), verify_tokens=256,
                            progress=False)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["sparsity"]["measured"] == pytest.approx(0.5, abs=1e-3)
    assert all(layer["output_sqnr_db"] is not None and layer["note"] is None for layer in report["layers"])
    assert result.verification["kl_mean"] > 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "sparsity_config" not in config
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = llmquant.load_model(out, dtype="float32").model
    assert _cosine(_logits(theirs, _ids()), _logits(ours, _ids())) >= 0.9999
    # Every weight matrix but the embeddings, the output layer and the routers is half zeros
    # (MoE experts too, held by transformers as 3-D tensors).
    matrices = {n: p for n, p in ours.named_parameters() if p.ndim >= 2 and "embed" not in n
                and "lm_head" not in n and not n.endswith("mlp.gate.weight")}
    assert any(p.ndim == 3 for p in matrices.values()) == (arch == "mixtral")
    for name, p in matrices.items():
        assert abs((p == 0).float().mean().item() - 0.5) < 0.01, name
    from llmquant.hub.model_card import build_model_card

    card, _ = build_model_card(out, "me/pruned")
    assert "- Sparsity: sparsegpt 50% unstructured; 50.0" in card and "sparse" in card
    with pytest.raises(OutputExistsError, match="already exists"):
        llmquant.prune(source, out, method="magnitude", verify_tokens=0, progress=False)


def test_n_of_m_names_the_layers_whose_width_does_not_divide(tiny_model_dir, tmp_path):
    with pytest.raises(InvalidConfigError, match=r"3:7 sparsity needs input widths that are multiples of 7"):
        llmquant.prune(tiny_model_dir, method="magnitude", pattern="3:7", verify_tokens=0, progress=False)
    with pytest.raises(InvalidConfigError, match="multiples of 7"):
        llmquant.quantize(tiny_model_dir, scheme="W8A16", gptq=True, prune="wanda", sparsity_pattern="3:7",
                          output=tmp_path / "o", **QUANT)
    assert not (tmp_path / "o").exists()


def test_refusals(tiny_model_dir, tmp_path):
    with pytest.raises(InvalidConfigError, match="--stream"):
        llmquant.quantize(tiny_model_dir, scheme="W4A16", prune="magnitude", stream=True, output=tmp_path / "s",
                          progress=False)
    with pytest.raises(InvalidConfigError, match="scales and norms only"):
        llmquant.quantize(tiny_model_dir, scheme="W4A16", prune="magnitude", self_distill=2, output=tmp_path / "s",
                          progress=False)
    quantized = llmquant.quantize(tiny_model_dir, scheme="W8A16", output=tmp_path / "q", **QUANT).output_dir
    with pytest.raises(InvalidConfigError, match="Unknown key.*blocksize"):
        llmquant.prune(tiny_model_dir, method="magnitude", blocksize=64, verify_tokens=0, progress=False)
    with pytest.raises(InvalidConfigError, match="already quantized"):
        llmquant.prune(quantized, method="magnitude", verify_tokens=0, progress=False)


def test_recipe_section_round_trips_and_flags_reach_it(tiny_model_dir, tmp_path):
    text = "quantize: {scheme: W4A16}\nsparsity: {method: wanda, pattern: '4:8'}\ngptq: {}\n"
    recipe = Recipe.from_yaml(text)
    assert recipe.sparsity.n_of_m == (4, 8) and recipe.sparsity.fraction == 0.5
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert [type(s).__name__ for s in recipe.steps()] == ["GPTQConfig", "RoundingConfig"]  # pruned inside GPTQ
    plain = Recipe.from_yaml("quantize: {scheme: W4A16}\nsparsity: {method: magnitude}\n")
    assert [type(s).__name__ for s in plain.steps()] == ["SparsityConfig", "RoundingConfig"]
    with pytest.raises(InvalidConfigError, match="Unknown key"):
        Recipe.from_yaml("quantize: {scheme: W4A16}\nsparsity: {method: wanda, ratio: 0.5}\n")
    out = tmp_path / "cli"
    cli = [sys.executable, "-m", "llmquant", "quantize", str(tiny_model_dir), "--scheme", "W8A16", "--prune",
           "magnitude", "--sparsity-pattern", "2:4", "--output", str(out), "-q", "--no-verify"]
    done = subprocess.run(cli, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "sparsity: magnitude 2:4; 50.0% of the weights of 14 pruned layers are zero" in done.stdout
    assert Recipe.load(out / "recipe.yaml").sparsity.pattern == "2:4"
    bad = subprocess.run(cli[:7] + ["--no-prune", "--sparsity-pattern", "2:4", "--output", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "pruning turned off" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("qat", [None, "W4A16"])
def test_distillation_recovers_a_pruned_model_with_its_masks_held(tiny_model_dir, tmp_path, qat):
    pruned = llmquant.prune(tiny_model_dir, tmp_path / "pruned", method="magnitude", pattern="2:4", verify_tokens=0,
                            progress=False).output_dir
    out = tmp_path / "recovered"
    result = llmquant.distill(tiny_model_dir, output=out, student_init=pruned, steps=6, batch_size=2, seq_len=64,
                              lr=5e-3, kd_weight=1.0, qat_scheme=qat, qat_group_size=32 if qat else None,
                              progress=False)
    before = llmquant.load_model(pruned, dtype="float32").model
    after = llmquant.load_model(out, dtype="float32").model
    if qat is None:
        trained = dict(after.named_parameters())
        changed = 0
        for name, p in before.named_parameters():
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
                assert follows_n_of_m(trained[name] != 0, 2, 4), name
                assert torch.equal(trained[name][p == 0], p[p == 0]), name  # pruned weights stayed exactly zero
                changed += int((trained[name] != p).sum())
        assert changed > 0  # the kept weights trained
    else:
        weights = _quantized_weights(after)
        assert weights and all(follows_n_of_m(w != 0, 2, 4) for w in weights.values())
