"""Read config.json and decide, before any weight is read, whether and how the model can load.

Three questions: can transformers build this architecture as a causal LM without running code
from the repository; is the folder quantized, and by a method llmquant reads; which dtype were the
weights stored in (reports compare against it).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from llmquant.errors import CorruptCheckpointError, UnsupportedArchitectureError

if TYPE_CHECKING:
    import torch

COMPRESSED_TENSORS = "compressed-tensors"
# safetensors dtype names -> torch dtype attribute names, for folders whose config has no dtype.
_SAFETENSORS_TO_TORCH = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(
            f"{path} is not valid JSON ({e}). Re-download the model or restore its config.json."
        ) from None
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{path} is not a JSON object. Re-download the model.")
    return config


def check_architecture(config: dict, where: str, trust_remote_code: bool) -> None:
    """Raise UnsupportedArchitectureError unless transformers can build a causal LM from `config`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    custom_class = (config.get("auto_map") or {}).get("AutoModelForCausalLM")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return  # transformers has it built in; an auto_map, if any, is not needed
    if custom_class:
        if trust_remote_code:
            return
        raise UnsupportedArchitectureError(
            f"{where} needs custom model code shipped with the checkpoint (config.json auto_map: "
            f"AutoModelForCausalLM -> {custom_class}); model type {model_type!r} is not built into "
            f"transformers. Running that code is off by default because it executes Python from the "
            "model repository. If you trust it, pass --trust-remote-code (trust_remote_code=True)."
        )
    if not model_type:
        raise UnsupportedArchitectureError(
            f"{where}: config.json has no model_type, so the architecture is unknown. Restore the "
            "config.json that belongs to this model."
        )
    if model_type in CONFIG_MAPPING_NAMES:
        raise UnsupportedArchitectureError(
            f"{where} is a {model_type!r} model, which transformers cannot load as a causal language "
            "model (text generation). llmquant quantizes decoder LLMs such as Llama, Qwen, Mistral, "
            "Gemma or Phi."
        )
    import transformers

    raise UnsupportedArchitectureError(
        f"{where} has model type {model_type!r}, which the installed transformers "
        f"{transformers.__version__} does not know. Upgrade transformers "
        "(pip install -U transformers) if the architecture is newer than it; otherwise check config.json."
    )


def quantization_method(config: dict) -> str | None:
    qcfg = config.get("quantization_config")
    if not qcfg:
        return None
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
    return str(method) if method else "unknown"


def check_quantization(config: dict, where: str) -> dict | None:
    """Return the compressed-tensors quantization_config, None for float weights; refuse others."""
    method = quantization_method(config)
    if method is None:
        return None
    if method == COMPRESSED_TENSORS:
        return config["quantization_config"]
    raise UnsupportedArchitectureError(
        f"{where} is quantized with {method!r} (config.json quantization_config.quant_method). llmquant "
        f"loads float checkpoints (fp32/fp16/bf16) and {COMPRESSED_TENSORS} quantized folders, such as "
        "the ones it writes. Use the original float model as the source instead."
    )


def stored_dtype(config: dict, safetensors_dtypes: Counter) -> "torch.dtype":
    """The dtype the weights were saved in: config.json's dtype, else the commonest float in the files."""
    import torch

    name = config.get("dtype") or config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    for st_name, _ in safetensors_dtypes.most_common():
        if st_name in _SAFETENSORS_TO_TORCH:
            return getattr(torch, _SAFETENSORS_TO_TORCH[st_name])
    return torch.float32  # transformers' own default when nothing says otherwise
