"""Loading local folders: results identical to transformers' own loading, in the requested dtype
and device, and pickle weights only when allowed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llmquant.errors import CorruptCheckpointError, PickleRefusedError
from llmquant.loading import LoadedModel, load_model

TEXT = "Quantization trades a little accuracy for a lot of memory."


def _logits(loaded_or_model, tokenizer) -> torch.Tensor:
    model = loaded_or_model.model if isinstance(loaded_or_model, LoadedModel) else loaded_or_model
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def reference_fp32(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_tiny_folder_loads_like_transformers(tiny_model_dir, reference_fp32):
    loaded = load_model(tiny_model_dir, dtype="float32", device="cpu")

    assert loaded.source.kind == "local" and loaded.source.path == tiny_model_dir.resolve()
    assert loaded.source.revision is None and loaded.source.describe() == str(tiny_model_dir.resolve())
    assert loaded.source_dtype == torch.bfloat16  # as saved, whatever the compute dtype
    assert loaded.quantization_config is None
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32 and loaded.model.device.type == "cpu"
    logits = _logits(loaded, loaded.tokenizer)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, _logits(reference_fp32, loaded.tokenizer))


def test_compute_dtype_and_device_are_applied(tiny_model_dir, device):
    loaded = load_model(str(tiny_model_dir), dtype="float16", device=device)
    assert loaded.model.dtype == torch.float16 and loaded.model.device.type == device.type
    assert loaded.source_dtype == torch.bfloat16  # still what the files hold
    ids = loaded.tokenizer(TEXT, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        assert torch.isfinite(loaded.model(ids).logits).all()


def test_sharded_folder_loads_with_identical_logits(tmp_path, tiny_model_dir, reference_fp32):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    bf16.save_pretrained(sharded, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, sharded / name)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1

    loaded = load_model(sharded, dtype="float32", device="cpu")
    torch.testing.assert_close(_logits(loaded, loaded.tokenizer), _logits(reference_fp32, loaded.tokenizer))


def _to_pickle_only(folder: Path) -> Path:
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_only_folder_is_refused(tiny_copy):
    folder = _to_pickle_only(tiny_copy)
    with pytest.raises(PickleRefusedError) as info:
        load_model(folder, device="cpu")
    message = str(info.value)
    assert "pytorch_model.bin" in message and "--allow-pickle" in message
    assert "execute arbitrary code" in message


def test_pickle_only_folder_loads_when_allowed(tiny_copy, reference_fp32):
    folder = _to_pickle_only(tiny_copy)
    loaded = load_model(folder, allow_pickle=True, dtype="float32", device="cpu")
    torch.testing.assert_close(_logits(loaded, loaded.tokenizer), _logits(reference_fp32, loaded.tokenizer))


def test_safetensors_win_over_pickle_even_when_pickle_is_allowed(tiny_copy, reference_fp32):
    # A pickle file that would fail to load proves it was not the one opened.
    (tiny_copy / "pytorch_model.bin").write_bytes(b"this is not a pickle")
    loaded = load_model(tiny_copy, allow_pickle=True, dtype="float32", device="cpu")
    torch.testing.assert_close(_logits(loaded, loaded.tokenizer), _logits(reference_fp32, loaded.tokenizer))


def test_folder_without_tokenizer_is_refused(tiny_copy):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny_copy / name).unlink()
    with pytest.raises(CorruptCheckpointError, match="no tokenizer files"):
        load_model(tiny_copy, device="cpu")


def test_weights_not_matching_config_are_refused_not_left_random(tiny_copy):
    from safetensors.torch import load_file, save_file

    tensors = load_file(tiny_copy / "model.safetensors")
    renamed = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}
    save_file(renamed, tiny_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match="lacks 9 weights") as info:
        load_model(tiny_copy, device="cpu")
    assert "model.layers.1." in str(info.value)


def test_demo_model_is_the_default_and_says_so(monkeypatch, capsys, tiny_model_dir):
    # LLMQUANT_DEMO_DIR points the demo at a ready folder, so nothing is materialized.
    monkeypatch.setenv("LLMQUANT_DEMO_DIR", str(tiny_model_dir))
    loaded = load_model(device="cpu")
    assert loaded.source.kind == "demo" and loaded.source.name == "demo:SmolLM2-135M-Instruct"
    assert loaded.source.path == tiny_model_dir and loaded.source.describe() == "demo:SmolLM2-135M-Instruct"
    assert "Using the built-in demo model SmolLM2-135M-Instruct" in capsys.readouterr().err
