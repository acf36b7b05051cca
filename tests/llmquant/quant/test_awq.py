"""AWQ-style scaling: pure scale math and search, exact folding, and better INT4 outputs."""

import pytest
import torch

from llmquant.errors import InvalidConfigError
from llmquant.config.args import QuantArgs
from llmquant.quant.algorithms.awq import awq_model, awq_scales, scaled_output_error, search_awq_alpha
from llmquant.config.recipe import AWQConfig, Recipe

INT4_G32 = QuantArgs(num_bits=4, strategy="group", group_size=32, observer="minmax")


def test_scales_are_normalized_powers_of_the_mean():
    mean = torch.tensor([4.0, 1.0, 0.25, 2.0])
    s = awq_scales(mean, 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 1.0, 0.5, 2 ** 0.5]))  # sqrt(max * min) of sqrt(mean) is 1
    assert torch.equal(awq_scales(mean, 0.0), torch.ones(4))


def test_search_finds_a_scaling_that_lowers_the_output_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g)
    x[:, [5, 40, 99]] *= 25.0  # a few loud input channels, as real layers have
    w = torch.randn(64, 128, generator=g)
    alpha, best, none = search_awq_alpha(x, [w], x.abs().mean(0), INT4_G32)
    assert alpha > 0 and best < 0.8 * none
    assert best == pytest.approx(scaled_output_error(x, [w], awq_scales(x.abs().mean(0), alpha), INT4_G32))


@pytest.fixture()
def loud_tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 3] *= 30.0
        model.model.embed_tokens.weight[:, 77] *= 20.0
    return model


def test_folding_keeps_the_function(loud_tiny):
    ids = torch.randint(0, loud_tiny.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = loud_tiny(ids).logits
        result = awq_model(loud_tiny, ids, INT4_G32, progress=False)
        after = loud_tiny(ids).logits
    assert any(a > 0 for a in result.applied.values()) and not result.skipped
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)


def test_quantize_runs_awq_before_rounding(loud_tiny, tiny_model_dir, tmp_path):
    """Through quantize(): the scales are searched per mapping, recorded, and the folded model
    is what gets rounded and saved (the reloaded checkpoint is the in-memory model)."""
    from transformers import AutoTokenizer

    from llmquant import load_model, quantize

    loud_tiny.to(torch.bfloat16).save_pretrained(tmp_path / "loud")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "loud")
    result = quantize(tmp_path / "loud", scheme="W4A16", group_size=32, awq=True, num_samples=8, seq_len=64,
                      output=tmp_path / "q", verify=False, progress=False, dtype="float32")
    assert result.recipe.awq == AWQConfig()
    alphas = result.report.smoothquant["alphas"]
    assert len(alphas) == 6 and any(a > 0 for a in alphas.values())
    norm = tmp_path / "loud"
    original = load_model(norm, dtype="float32").model.model.layers[0].input_layernorm.weight
    assert not torch.equal(result.model.model.layers[0].input_layernorm.weight, original)  # scales folded
    ids = torch.arange(5, 69)[None]
    with torch.inference_mode():
        a = result.model(ids).logits
        b = load_model(tmp_path / "q", dtype="float32").model(ids).logits
    assert torch.allclose(a, b, atol=1e-4)


def test_recipe():
    r = Recipe.from_yaml("quantize: {scheme: W4A16}\nawq: {grid: 10}\ngptq: {}\n")
    assert r.awq == AWQConfig(grid=10) and Recipe.from_yaml(r.to_yaml()) == r
    with pytest.raises(InvalidConfigError, match="weight-only"):
        Recipe.from_yaml("quantize: {scheme: W8A8}\nawq: {}\n")
    with pytest.raises(InvalidConfigError, match="valid keys: grid"):
        Recipe.from_yaml("quantize: {scheme: W4A16}\nawq: {alpha: 1}\n")
