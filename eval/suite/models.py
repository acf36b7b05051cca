"""Turn a suite's model entry into something to measure: a loaded model, a folder, or a URL.

* `source`: loaded with `llmquant.load_model` (Hub id, folder, .gguf, demo; our quantized
  folders load with our quantized layers).
* `quantize`: `llmquant.quantize(source, **quantize)` once, saved under
  OUTPUT/models/NAME-HASH (the hash covers the source's identity and the arguments, so a changed
  recipe makes a new folder and an unchanged one is reused), then loaded like any folder.
* `bitsandbytes`: transformers' `BitsAndBytesConfig` (LLM.int8 or NF4) on the source's folder;
  the size reported is the quantized model's memory footprint, as nothing is saved.
* `url`: nothing to load; tasks talk to the server.

`identity` is what the reuse rule hashes: the source's files (names, sizes, modification
times), the quantize arguments, the library versions that change numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmquant.eval.suite.config import ModelSpec
from llmquant.eval.throughput import checkpoint_bytes


class SkipModel(Exception):
    """This model cannot be measured here (a missing optional package, an unsupported device)."""


@dataclass
class SuiteModel:
    spec: ModelSpec
    loaded: Any = None  # LoadedModel for local models
    folder: Path | None = None  # what `llmquant serve` can load (None for bitsandbytes and URLs)
    size_bytes: int | None = None
    size_kind: str = ""  # "weight files" | "memory footprint"
    load_seconds: float | None = None
    prepare_seconds: float | None = None  # quantizing on the fly, when it happened in this run
    rss_before_load: int | None = None  # the process's resident memory just before loading

    def info(self) -> dict[str, Any]:
        return {"name": self.spec.name, "kind": self.spec.kind, "source": self.spec.source, "url": self.spec.url,
                "folder": str(self.folder) if self.folder else None, "size_bytes": self.size_bytes,
                "size_kind": self.size_kind, "load_seconds": self.load_seconds,
                "prepare_seconds": self.prepare_seconds,
                "description": self.loaded.source.describe() if self.loaded is not None else self.spec.url}


def source_identity(source: str | None) -> dict[str, Any]:
    """Names, sizes and modification times of a local source's files; the id of a Hub source."""
    from llmquant.loading.demo import DEMO_ID, demo_model_dir

    if source in (None, "demo", DEMO_ID):
        path = demo_model_dir()
    else:
        path = Path(source).expanduser()
    if not path.exists():
        return {"source": str(source)}  # a Hub id: the name (and the pinned revision in it, if any)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {"source": str(path.absolute()),
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def identity(spec: ModelSpec) -> dict[str, Any]:
    from llmquant import __version__

    ident: dict[str, Any] = {"kind": spec.kind, "dtype": spec.dtype, "device": spec.device, "llmquant": __version__}
    if spec.kind == "url":
        ident.update(url=spec.url, served_model=spec.served_model, tokenizer=spec.tokenizer)
        return ident
    ident["source"] = source_identity(spec.load_source)
    if spec.quantize is not None:
        ident["quantize"] = spec.quantize
    if spec.bitsandbytes is not None:
        ident["bitsandbytes"] = spec.bitsandbytes
        ident["bitsandbytes_version"] = _version("bitsandbytes")
    return ident


def digest(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


def prepare(spec: ModelSpec, output: Path, *, progress: bool = True) -> SuiteModel:
    """Quantize if needed and load the model (not for URLs)."""
    model = SuiteModel(spec=spec)
    if spec.kind == "url":
        return model
    if spec.kind == "bitsandbytes":
        return _load_bitsandbytes(spec, model)
    folder = _quantized_folder(spec, output, model, progress) if spec.kind == "quantize" else None
    from llmquant import load_model

    model.rss_before_load = current_rss()
    t = time.perf_counter()
    model.loaded = load_model(folder if folder is not None else spec.load_source, dtype=spec.dtype, device=spec.device)
    model.load_seconds = time.perf_counter() - t
    model.folder = folder if folder is not None else model.loaded.source.path
    model.size_bytes, model.size_kind = checkpoint_bytes(model.folder), "weight files"
    return model


def _quantized_folder(spec: ModelSpec, output: Path, model: SuiteModel, progress: bool) -> Path:
    from llmquant import quantize

    folder = output / "models" / f"{spec.name}-{digest(identity(spec), 12)}"
    if not (folder / "config.json").is_file():  # quantize writes atomically: a folder here is complete
        t = time.perf_counter()
        quantize(spec.load_source, output=folder, dtype=spec.dtype, device=spec.device, progress=progress,
                 **spec.quantize)
        model.prepare_seconds = time.perf_counter() - t
    return folder


def _load_bitsandbytes(spec: ModelSpec, model: SuiteModel) -> SuiteModel:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SkipModel("bitsandbytes is not installed (pip install bitsandbytes)") from None
    except Exception as e:  # noqa: BLE001 - it probes its native backends at import and can fail there
        raise SkipModel(f"bitsandbytes cannot start here: {type(e).__name__}: {str(e).splitlines()[0][:200]}") \
            from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llmquant.loading import LoadedModel, resolve_source
    from llmquant.loading.load import load_tokenizer as load_folder_tokenizer
    from llmquant.runtime import resolve_device, resolve_dtype

    source = resolve_source(spec.load_source)
    if source.kind == "gguf":
        raise SkipModel("bitsandbytes baselines load safetensors folders, not .gguf files")
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if spec.bitsandbytes == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model.rss_before_load = current_rss()
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LLM.int8 warns on every call that it casts inputs to float16
        try:
            lm = AutoModelForCausalLM.from_pretrained(source.path, quantization_config=config, dtype=dtype,
                                                      device_map=str(device))
        except (ImportError, RuntimeError, ValueError, NotImplementedError) as e:
            raise SkipModel(f"bitsandbytes {spec.bitsandbytes} cannot run on {device}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}") from None
    model.load_seconds = time.perf_counter() - t
    model.loaded = LoadedModel(model=lm.eval(), tokenizer=load_folder_tokenizer(source.path, False), source=source,
                               source_dtype=dtype, quantization_config=None)
    model.size_bytes, model.size_kind = int(lm.get_memory_footprint()), "memory footprint"
    _silence_int8_warnings()
    return model


def _silence_int8_warnings() -> None:
    # The warning is issued on every forward of every LLM.int8 layer; it says nothing new.
    warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")


def current_rss() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def api_key(spec: ModelSpec) -> str | None:
    return os.environ.get(spec.api_key_env) if spec.api_key_env else None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
