"""Fixtures for the push tests: a local upload-capable Hub server and a small quantized folder."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TOKEN = "hf_PushTestTokenThatMustNeverBePrinted42"
# A closed local port: "the network is down" without waiting for a timeout.
UNREACHABLE_ENDPOINT = "http://127.0.0.1:9"


def _load_sibling(name: str):
    # The test folder is not a package (pytest runs in importlib mode): load the helper by path.
    spec = importlib.util.spec_from_file_location(f"llmquant_hub_tests_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


hub_upload_server = _load_sibling("hub_upload_server")


@pytest.fixture(scope="module")
def upload_hub():
    hub = hub_upload_server.UploadHub(tokens={TOKEN, "hf_SomeoneElsesToken"})
    hub.start()
    yield hub
    hub.stop()


@pytest.fixture(scope="session")
def quantized_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model quantized by llmquant (W8A8, so calibration is recorded), with a perplexity
    result saved next to it the way `llmquant eval perplexity --output` saves one. Read-only."""
    import llmquant
    from llmquant.eval import perplexity

    out = tmp_path_factory.mktemp("quantized") / "tiny-W8A8"
    llmquant.quantize(str(tiny_model_dir), scheme="W8A8", output=out, num_samples=4, seq_len=64,
                      verify_tokens=256, progress=False)
    result = perplexity(str(out), max_tokens=512, window=128, progress=False)
    (out / "perplexity_quantized.json").write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    return out


@pytest.fixture
def folder(tmp_path, quantized_dir) -> Path:
    """A private, writable copy of the quantized folder."""
    return Path(shutil.copytree(quantized_dir, tmp_path / "tiny-W8A8"))


@pytest.fixture(scope="session")
def hub_consts():
    """The test token and a closed endpoint, for test modules (which cannot import a conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(token=TOKEN, unreachable=UNREACHABLE_ENDPOINT)


@pytest.fixture
def no_xet(monkeypatch):
    """Weights through the Git LFS path the test server implements (Xet needs a CAS server)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def hub_env(monkeypatch, tmp_path, upload_hub, hub_consts):
    """The huggingface_hub client pointed at the test Hub, with a token in HF_TOKEN and no saved login."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", upload_hub.url)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", hub_consts.token)
    return monkeypatch
