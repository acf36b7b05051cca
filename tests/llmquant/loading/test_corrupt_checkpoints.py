"""Damaged checkpoints fail before loading, with an error naming the damaged file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from llmquant.errors import CorruptCheckpointError
from llmquant.loading import load_model
from llmquant.loading.safetensors_check import read_safetensors_header


def _write_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _load_error(folder: Path) -> str:
    with pytest.raises(CorruptCheckpointError) as info:
        load_model(folder, device="cpu")
    return str(info.value)


def test_header_reader_agrees_with_the_safetensors_library(tiny_model_dir):
    from safetensors import safe_open

    tensors = read_safetensors_header(tiny_model_dir / "model.safetensors")
    with safe_open(tiny_model_dir / "model.safetensors", framework="pt") as f:
        assert set(tensors) == set(f.keys())
        for name in f.keys():
            assert tensors[name].shape == tuple(f.get_slice(name).get_shape())
            assert tensors[name].dtype == f.get_slice(name).get_dtype()


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_weights_are_named(tiny_copy, keep):
    path = tiny_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    message = _load_error(tiny_copy)
    assert str(path) in message and "truncated" in message


def test_file_cut_inside_its_header_is_named(tiny_copy):
    path = tiny_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    message = _load_error(tiny_copy)
    assert str(path) in message and "truncated" in message


def test_garbage_file_is_named(tiny_copy):
    path = tiny_copy / "model.safetensors"
    path.write_bytes(b"<html><body>404 Not Found</body></html>" * 10)
    message = _load_error(tiny_copy)
    assert str(path) in message and "not a safetensors header" in message


def test_header_that_is_not_json_is_named(tiny_copy):
    path = tiny_copy / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 64)
    message = _load_error(tiny_copy)
    assert str(path) in message and "not valid JSON" in message


def test_extra_bytes_after_the_tensors_are_reported(tiny_copy):
    path = tiny_copy / "model.safetensors"
    path.write_bytes(path.read_bytes() + b"\0" * 7)
    assert "extra bytes" in _load_error(tiny_copy)


def test_shape_that_does_not_fit_the_byte_span_is_reported(tmp_path):
    path = _write_safetensors(tmp_path / "w.safetensors",
                              {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}, b"\0" * 32)
    with pytest.raises(CorruptCheckpointError, match=r"tensor 'w' \(F32, shape \[4, 4\]\) needs 64 bytes"):
        read_safetensors_header(path)


def test_overlapping_tensors_are_reported(tmp_path):
    header = {"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
              "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}}
    path = _write_safetensors(tmp_path / "w.safetensors", header, b"\0" * 12)
    with pytest.raises(CorruptCheckpointError, match="overlaps"):
        read_safetensors_header(path)


def test_sub_byte_and_fp8_dtypes_are_sized_correctly(tmp_path):
    # F4 packs two values per byte; F8_E4M3 is one byte: both must pass the size check.
    header = {"packed": {"dtype": "F4", "shape": [4, 8], "data_offsets": [0, 16]},
              "fp8": {"dtype": "F8_E4M3", "shape": [16], "data_offsets": [16, 32]},
              "__metadata__": {"format": "pt"}}
    path = _write_safetensors(tmp_path / "w.safetensors", header, b"\0" * 32)
    assert set(read_safetensors_header(path)) == {"packed", "fp8"}


@pytest.fixture
def sharded_copy(tmp_path, tiny_model_dir) -> Path:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(
        out, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, out / name)
    return out


def test_index_referencing_a_missing_shard_is_named(sharded_copy):
    shard = sorted(sharded_copy.glob("model-*.safetensors"))[-1]
    shard.unlink()
    message = _load_error(sharded_copy)
    assert shard.name in message and "model.safetensors.index.json" in message


def test_truncated_shard_is_named(sharded_copy):
    shard = sorted(sharded_copy.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    message = _load_error(sharded_copy)
    assert str(shard) in message and "truncated" in message


def test_index_that_disagrees_with_a_shard_is_reported(sharded_copy):
    index_path = sharded_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"]["model.layers.0.not_a_real_weight"] = index["weight_map"][first]
    index_path.write_text(json.dumps(index))
    assert "not_a_real_weight" in _load_error(sharded_copy)


def test_config_that_is_not_json_is_named(tiny_copy):
    (tiny_copy / "config.json").write_text("{ truncated")
    message = _load_error(tiny_copy)
    assert "config.json" in message and "not valid JSON" in message


def test_file_named_gguf_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.Q4_0.gguf"
    path.write_bytes(b"<!DOCTYPE html>" + b"\0" * 100)
    with pytest.raises(CorruptCheckpointError, match="is not a GGUF file"):
        load_model(path, device="cpu")


def test_truncated_tokenizer_is_reported(tiny_copy):
    path = tiny_copy / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:5001])
    message = _load_error(tiny_copy)
    assert f"The tokenizer files in {tiny_copy}" in message and "JSONDecodeError" in message
