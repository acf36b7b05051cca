"""Hub ids without the Hub: HF_HUB_OFFLINE=1, and an unreachable endpoint.

The cache is built by hand in the layout huggingface_hub documents, in a temporary HF_HOME, and
each environment's cases resolve in one fresh interpreter (see resolve_runner.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llmquant.errors import CorruptCheckpointError
from llmquant.loading import ModelSource, load_model

COMMIT = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_model_dir, helpers) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    partial = tmp_path_factory.mktemp("partial")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, partial / name)
    helpers.build_hf_cache(home, "org/cached", tiny_model_dir, COMMIT)
    helpers.build_hf_cache(home, "org/partial", partial, COMMIT)  # weights never downloaded
    return home


@pytest.fixture(scope="module")
def offline(hf_home, helpers):
    cases = {"hit": {"source": "org/cached"}, "miss": {"source": "org/never-downloaded"},
             "partial": {"source": "org/partial"}}
    return helpers.resolve_in_child(cases, hf_home, {"HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def unreachable(hf_home, helpers):
    # Online mode, but HF_ENDPOINT is a closed port (the default in child_env).
    cases = {"hit": {"source": "org/cached"}, "miss": {"source": "org/some-model"}}
    return helpers.resolve_in_child(cases, hf_home)


def _as_source(data: dict) -> ModelSource:
    return ModelSource(kind=data["kind"], name=data["name"], path=Path(data["path"]),
                       revision=data["revision"])


def test_offline_cache_hit_loads_the_cached_commit(offline, hf_home, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    source = _as_source(offline.outcomes["hit"].resolved())
    assert (source.kind, source.revision) == ("hub", COMMIT)
    assert source.path == hf_home / "hub" / "models--org--cached" / "snapshots" / COMMIT

    loaded = load_model(source, dtype="float32", device="cpu")
    ids = loaded.tokenizer("offline text", return_tensors="pt").input_ids
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits)


def test_a_cached_hub_model_streams_layer_by_layer(offline, tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from llmquant import quantize

    source = _as_source(offline.outcomes["hit"].resolved())  # files are symlinks into the cache's blobs
    args = dict(scheme="W4A16", group_size=32, gptq=True, num_samples=4, seq_len=32, verify=False, progress=False)
    quantize(source, output=tmp_path / "streamed", stream=True, **args)
    quantize(tiny_model_dir, output=tmp_path / "whole", stream=False, **args)
    streamed, whole = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("streamed", "whole"))
    assert streamed.keys() == whole.keys() and all(torch.equal(streamed[k], whole[k]) for k in whole)


def test_offline_cache_miss_explains_how_to_fill_the_cache(offline, hf_home):
    message = offline.outcomes["miss"].failed_with("OfflineCacheMissError")
    assert "org/never-downloaded (revision main): it is not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE" in message and "hf download org/never-downloaded" in message
    assert str(hf_home / "hub") in message  # which cache was searched


def test_cached_snapshot_without_weights_is_reported_at_load(offline):
    source = _as_source(offline.outcomes["partial"].resolved())
    with pytest.raises(CorruptCheckpointError, match="has no model weights") as info:
        load_model(source, device="cpu")
    assert f"org/partial@{COMMIT[:7]}" in str(info.value)


def test_unreachable_hub_says_so_and_suggests_offline_mode(unreachable):
    message = unreachable.outcomes["miss"].failed_with("OfflineCacheMissError")
    assert "Cannot reach the Hub at http://127.0.0.1:9" in message
    assert "HF_HUB_OFFLINE=1" in message


def test_unreachable_hub_falls_back_to_the_cache(unreachable):
    assert unreachable.outcomes["hit"].resolved()["revision"] == COMMIT
