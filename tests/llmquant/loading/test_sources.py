"""What a model argument means: a path, a Hub id, or the demo; and the errors for neither."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmquant.errors import CorruptCheckpointError, InvalidConfigError, SourceNotFoundError
from llmquant.loading import ModelSource, resolve_source
from llmquant.loading.sources import is_hub_id, looks_like_path


@pytest.mark.parametrize("text", ["./model", "../m", "/abs/model", "~/models/x", "a/b/c",
                                  "model.gguf", "org/weights.safetensors", "x.bin"])
def test_path_like_text(text):
    assert looks_like_path(text)


@pytest.mark.parametrize("text", ["gpt2", "org/name", "HuggingFaceTB/SmolLM2-135M-Instruct",
                                  "Qwen/Qwen2.5-0.5B", "org/name.v2"])
def test_hub_ids(text):
    assert not looks_like_path(text) and is_hub_id(text)


@pytest.mark.parametrize("text", ["org/na me", "org--x/name", "-org/name", "org/name/"])
def test_invalid_hub_ids(text):
    assert not is_hub_id(text)


@pytest.mark.parametrize("text", ["./no-such-model", "/no/such/folder", "~/no-such-dir/model",
                                  "no-such.gguf"])
def test_missing_path_says_the_path_does_not_exist(tmp_path, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceNotFoundError, match=r"The path .* does not exist") as info:
        resolve_source(text)
    assert "Hub has no repository" not in str(info.value)


def test_pathlike_that_does_not_exist_is_never_sent_to_the_hub(tmp_path):
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        resolve_source(Path("org-name"))  # a valid Hub id as text, but given as a Path


def test_text_that_is_neither_path_nor_hub_id():
    with pytest.raises(SourceNotFoundError, match="neither an existing path nor a valid"):
        resolve_source("not a model name")


def test_existing_relative_folder_wins_over_a_hub_id(tmp_path, monkeypatch, tiny_model_dir):
    (tmp_path / "org").mkdir()
    os.symlink(tiny_model_dir, tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    source = resolve_source("org/name")
    assert source == ModelSource(kind="local", name="org/name", path=tiny_model_dir.resolve(), revision=None)


def test_gguf_file_is_its_own_kind(tmp_path):
    path = tmp_path / "m.Q4_0.gguf"
    path.write_bytes(b"GGUF")
    source = resolve_source(str(path))
    assert (source.kind, source.path, source.describe()) == ("gguf", path, str(path))


def test_folder_with_weights_but_no_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="no config.json"):
        resolve_source(tmp_path)


def test_empty_folder_is_not_a_model(tmp_path):
    with pytest.raises(InvalidConfigError, match="not a model folder"):
        resolve_source(tmp_path)


def test_revision_with_a_local_folder_is_refused(tiny_model_dir):
    with pytest.raises(InvalidConfigError, match="--revision v2 only applies to Hub ids"):
        resolve_source(tiny_model_dir, revision="v2")


def test_demo_id_resolves_to_the_demo(monkeypatch, tiny_model_dir, capsys):
    monkeypatch.setenv("LLMQUANT_DEMO_DIR", str(tiny_model_dir))
    source = resolve_source("demo:SmolLM2-135M-Instruct")
    assert (source.kind, source.path) == ("demo", tiny_model_dir)
    assert capsys.readouterr().err == ""  # named explicitly: no notice needed


def test_hub_describe_shows_a_short_commit():
    source = ModelSource("hub", "org/name", Path("/c"), "0123456789abcdef0123456789abcdef01234567")
    assert source.describe() == "org/name@0123456"
