"""Fixtures for the loading tests: a local Hub server, a hand-built Hugging Face cache, a tiny GGUF
file, and a way to resolve model sources in a fresh process with chosen HF_* variables."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).parent
RUNNER = HERE / "resolve_runner.py"
# Variables that would let the developer's own Hub setup leak into a test.
_HF_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                 "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH",
                 "HF_OIDC_RESOURCE", "XDG_CACHE_HOME")
# A closed local port: a case that forgets HF_ENDPOINT fails fast instead of going online.
UNREACHABLE_ENDPOINT = "http://127.0.0.1:9"


def _load_sibling(name: str):
    # The test folder is not a package (pytest runs in importlib mode): load the helper by path.
    spec = importlib.util.spec_from_file_location(f"llmquant_loading_tests_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


hub_server_module = _load_sibling("hub_server")


def child_env(hf_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child process: HF_HOME=hf_home and none of the developer's HF_* settings."""
    env = {k: v for k, v in os.environ.items() if k not in _HF_VARIABLES}
    env.update(HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_ENDPOINT=UNREACHABLE_ENDPOINT)
    env.update(extra or {})
    return env


@dataclass
class Outcome:
    """What resolving one case gave: a source (dict) or a user error (class name and message)."""

    case: str
    source: dict | None = None
    error: str | None = None
    message: str | None = None

    def resolved(self) -> dict:
        assert self.source is not None, f"{self.case}: {self.error}: {self.message}"
        return self.source

    def failed_with(self, error_class: str) -> str:
        got = self.error or self.source
        assert self.error == error_class, f"{self.case}: expected {error_class}, got {got}"
        return self.message


@dataclass
class Batch:
    outcomes: dict[str, Outcome]
    output: str  # everything the child printed, to check that no secret leaked
    hf_home: Path  # the HF_HOME the child used (its cache is left for later cases)


def resolve_in_child(cases: dict[str, dict], hf_home: Path, env: dict[str, str] | None = None) -> Batch:
    """Resolve each case ({"source", "revision"?, "allow_pickle"?}) in one fresh interpreter."""
    requests = [{"case": name, **spec} for name, spec in cases.items()]
    proc = subprocess.run([sys.executable, str(RUNNER), json.dumps(requests)], capture_output=True,
                          text=True, env=child_env(hf_home, env), timeout=300)
    assert proc.returncode == 0, proc.stderr
    outcomes = [Outcome(**json.loads(line)) for line in proc.stdout.splitlines() if line.startswith("{")]
    return Batch({o.case: o for o in outcomes}, proc.stdout + proc.stderr, hf_home)


@pytest.fixture(scope="module")
def hub_server():
    server = hub_server_module.HubServer()
    server.url = server.start()
    yield server
    server.stop()


def build_hf_cache(hf_home: Path, repo_id: str, folder: Path, commit: str, ref: str = "main") -> Path:
    """Lay `folder`'s files out as huggingface_hub's cache does; return the snapshot folder.

    hub/models--{org}--{name}/blobs/<file hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>,
    refs/<ref> holding the commit (https://huggingface.co/docs/huggingface_hub/guides/manage-cache).
    """
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    return snapshot


def save_sharded(src: Path, out: Path, max_shard_size: str = "200KB") -> Path:
    """Re-save the model in `src` as several safetensors shards plus an index, with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(
        out, max_shard_size=max_shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out


def pickle_only_copy(src: Path, out: Path) -> Path:
    """The model in `src` with its weights as pytorch_model.bin only (a pickle checkpoint)."""
    import torch
    from safetensors.torch import load_file

    out.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, out / name)
    torch.save(load_file(src / "model.safetensors"), out / "pytorch_model.bin")
    return out


@pytest.fixture(scope="session")
def helpers() -> SimpleNamespace:
    """The helper functions above, for test modules (which cannot import a conftest)."""
    return SimpleNamespace(child_env=child_env, resolve_in_child=resolve_in_child,
                           build_hf_cache=build_hf_cache, save_sharded=save_sharded,
                           pickle_only_copy=pickle_only_copy)


@pytest.fixture
def tiny_gguf(tmp_path, tiny_model_dir) -> Path:
    """The tiny model written as a float32 GGUF file with llama.cpp's `gguf` library."""
    return _load_sibling("tiny_gguf").write_llama_gguf(tiny_model_dir, tmp_path / "tiny-F32.gguf")


@pytest.fixture
def tiny_copy(tmp_path, tiny_model_dir) -> Path:
    """A private, writable copy of the tiny model folder (the session fixture is read-only)."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "tiny-copy"))
