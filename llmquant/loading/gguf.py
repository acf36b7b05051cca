"""GGUF files: load through transformers (which dequantizes to float) and convert to safetensors.

transformers marks a GGUF-loaded model with `config.quantization_config = {"quant_method": "gguf"}`
even though its Linear weights are plain floats after loading. That marker must not travel into
a saved checkpoint: a folder carrying it would be read back as GGUF. `gguf_to_checkpoint` drops it
and rebuilds an ordinary model of the same class before saving.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llmquant.errors import CorruptCheckpointError, MissingDependencyError


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "Reading .gguf files needs the 'gguf' package: pip install gguf"
        ) from None


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer) from a .gguf file, weights dequantized to `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf_package()
    path = Path(path)
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # Dequantizing GGUF blocks runs in float32; cast afterwards if another dtype is wanted.
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise CorruptCheckpointError(
            f"Could not read the GGUF file {path}: {e}. Check that the file is complete "
            "(re-download it) and that its architecture is one transformers can load from GGUF."
        ) from None
    model = _drop_gguf_marker(model)
    return model.to(dtype), tokenizer


def _drop_gguf_marker(model):
    """Rebuild `model` as a plain transformers model without the GGUF quantization marker."""
    from accelerate import init_empty_weights

    config = model.config
    if getattr(config, "quantization_config", None) is None:
        return model
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    clean_config = type(config).from_dict(config_dict)
    with init_empty_weights(include_buffers=False):
        clean = type(model)(clean_config)
    clean.load_state_dict(model.state_dict(), strict=False, assign=True)
    clean.tie_weights()
    clean.eval()
    return clean


def gguf_to_checkpoint(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                       dtype: torch.dtype = torch.bfloat16) -> Path:
    """Convert a .gguf file to an ordinary Hugging Face folder (safetensors, config, tokenizer).

    Writes into `out_dir`, which must not exist yet; callers wanting atomicity pass a
    temporary folder and rename it afterwards.
    """
    model, tokenizer = load_gguf(gguf_path, dtype=dtype)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
