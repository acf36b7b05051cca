"""quantize() -> folder -> load_model(): the saved checkpoint is the in-memory quantized model."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmquant import load_model, quantize
from llmquant.checkpoint.save import save_quantized
from llmquant.errors import CorruptCheckpointError, InvalidConfigError
from llmquant.quant.linear import QuantizedLinear
from llmquant.config.recipe import Recipe

SCHEMES = ["W8A16", "W4A16", "W4A16_ASYM", "W8A8", "FP8", "FP8_DYNAMIC", "FP8_W"]
SMALL = dict(num_samples=4, seq_len=64, verify_tokens=256, progress=False, dtype="float32")


@pytest.fixture(scope="module")
def tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    from pydoc_data.topics import topics

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tok(topics["exceptions"], return_tensors="pt").input_ids[:, :96]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_saved_folder_reloads_as_the_same_quantized_model(tiny_model_dir, tmp_path, tokens, scheme):
    out = tmp_path / scheme
    result = quantize(tiny_model_dir, scheme=scheme, output=out, **SMALL)
    assert result.output_dir == out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    assert Recipe.from_yaml((out / "recipe.yaml").read_text()) == result.recipe
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["summary"]["quantized_layers"] == 14
    assert report["source"]["name"] == str(tiny_model_dir)

    loaded = load_model(out, dtype="float32")
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14  # quantized layers, not float copies
    assert not any(isinstance(m, torch.nn.Linear) and m.weight.shape[0] != loaded.model.config.vocab_size
                   for m in loaded.model.modules())
    with torch.inference_mode():
        ours = result.model(tokens).logits
        reloaded = loaded.model(tokens).logits
    assert torch.allclose(ours, reloaded, atol=1e-4, rtol=1e-4)

    v = result.verification
    assert v.tokens == 256 and 0 <= v.kl_mean < 0.5 and 0.5 < v.top1_agreement <= 1.0


def test_more_bits_move_the_model_less(tiny_model_dir):
    kl = {s: quantize(tiny_model_dir, scheme=s, **SMALL).verification.kl_mean for s in ("W8A16", "W4A16")}
    assert kl["W8A16"] * 10 < kl["W4A16"]


def test_sharded_checkpoint_loads_identically(tiny_model_dir, tmp_path, tokens):
    result = quantize(tiny_model_dir, scheme="W4A16", verify=False, **{k: v for k, v in SMALL.items()
                                                                       if k != "verify_tokens"})
    from transformers import AutoTokenizer

    save_quantized(result.model, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path,
                   json.loads(json.dumps(_qcfg(result))), storage_dtype=torch.bfloat16, max_shard_bytes=60_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_model(tmp_path, dtype="float32")
    with torch.inference_mode():
        assert torch.allclose(result.model(tokens).logits, loaded.model(tokens).logits, atol=1e-4)


def _qcfg(result):
    from llmquant.checkpoint.ct_config import build_quantization_config

    return build_quantization_config([(result.recipe.scheme, ["Linear"])], ["lm_head"])


@pytest.fixture()
def saved_w8a16(tiny_model_dir, tmp_path):
    out = tmp_path / "w8a16"
    quantize(tiny_model_dir, scheme="W8A16", output=out, verify=False, progress=False)
    return out


def test_missing_tensor_is_reported_by_name(saved_w8a16):
    tensors = load_file(saved_w8a16 / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(tensors, saved_w8a16 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match="down_proj.weight_scale"):
        load_model(saved_w8a16)


def test_unexpected_tensor_is_reported_by_name(saved_w8a16):
    tensors = load_file(saved_w8a16 / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight_g_idx"] = torch.zeros(128, dtype=torch.int32)
    save_file(tensors, saved_w8a16 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match="weight_g_idx"):
        load_model(saved_w8a16)


@pytest.mark.parametrize("edit, phrase", [
    (lambda q: q["config_groups"]["group_0"]["weights"].update(actorder="group"), "activation ordering"),
    (lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float"}), "KV-cache"),
    (lambda q: q["config_groups"]["group_0"].update(format="nvfp4-pack-quantized"), "nvfp4"),
])
def test_features_we_cannot_execute_are_refused(saved_w8a16, edit, phrase):
    path = saved_w8a16 / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))
    with pytest.raises(InvalidConfigError, match=phrase):
        load_model(saved_w8a16)
