"""`load_model`: from a model source to a model and tokenizer ready to run.

All checks that can fail on the user's input (architecture, quantization method, weight files,
tokenizer presence) run before transformers reads a single tensor, so that a bad checkpoint costs
a second and names its fault, instead of minutes and a stack trace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmquant.errors import CorruptCheckpointError, InvalidConfigError
from llmquant.loading.architecture import (
    check_architecture,
    check_quantization,
    read_config,
    stored_dtype,
)
from llmquant.loading.sources import ModelSource, resolve_source
from llmquant.loading.validation import CheckedWeights, check_weights, has_tokenizer_files

if TYPE_CHECKING:
    import torch

    from llmquant.loading.layer_stream import LayerStream
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# How many names to show when a checkpoint lacks weights its config asks for.
_SHOWN_NAMES = 3


@dataclass
class LoadedModel:
    model: "PreTrainedModel"  # eval() mode, on the device, in the compute dtype
    tokenizer: "PreTrainedTokenizerBase"
    source: ModelSource
    source_dtype: "torch.dtype"  # dtype the weights were stored in (config dtype; GGUF -> bfloat16)
    quantization_config: dict | None  # config.json's compressed-tensors quantization_config, else None
    # Streamed (load_model(stream=True)): the model's parameters are on the meta device and this
    # reads them from the files one module at a time (loading/layer_stream.py); None: all in memory.
    weights: "LayerStream | None" = None


def load_model(source: str | os.PathLike | ModelSource | None = None, *, revision: str | None = None,
               token: str | None = None, dtype: "str | torch.dtype" = "auto",
               device: "str | torch.device | None" = None, allow_pickle: bool = False,
               trust_remote_code: bool = False, stream: bool = False) -> LoadedModel:
    """Load a Hub id, a local folder, a .gguf file, or (None) the built-in demo model.

    `source` may also be a `ModelSource` returned by `resolve_source`, to load what was resolved
    earlier without resolving it again. `stream=True` reads no weight yet: the model is built on
    the meta device and `LoadedModel.weights` loads one module at a time (safetensors folders).
    """
    # Imported here, not at the top: resolving a source (sources.py) must not need torch.
    from llmquant.runtime import resolve_device, resolve_dtype

    target_device = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, target_device)
    if not isinstance(source, ModelSource):
        source = resolve_source(source, revision=revision, token=token, allow_pickle=allow_pickle)
    if source.kind == "gguf":
        if stream:
            raise InvalidConfigError(f"{source.describe()} is a GGUF file; a layer-by-layer (streamed) run reads "
                                     "safetensors folders only. Run without --stream.")
        return _load_gguf(source, compute_dtype, target_device)
    if stream:
        return _stream_folder(source, compute_dtype, target_device, trust_remote_code)
    return _load_folder(source, compute_dtype, target_device, allow_pickle, trust_remote_code)


def _load_gguf(source: ModelSource, dtype: "torch.dtype", device: "torch.device") -> LoadedModel:
    import torch

    from llmquant.loading.gguf import load_gguf

    with open(source.path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CorruptCheckpointError(
            f"{source.path} is not a GGUF file (it does not start with the GGUF magic bytes); it may "
            "be truncated, an HTML error page saved by a failed download, or a misnamed file."
        )
    model, tokenizer = load_gguf(source.path, dtype)
    # A GGUF file has no single torch dtype (its tensors are quantized blocks); report bfloat16,
    # the dtype gguf_to_checkpoint saves such a model in.
    return LoadedModel(model=model.to(device).eval(), tokenizer=tokenizer, source=source,
                       source_dtype=torch.bfloat16, quantization_config=None)


@dataclass(frozen=True)
class CheckedFolder:
    config: dict
    quantization_config: dict | None
    weights: CheckedWeights


def check_model_folder(folder: Path, where: str, *, allow_pickle: bool = False,
                       trust_remote_code: bool = False) -> CheckedFolder:
    """Every check `load_model` runs on a folder before reading a tensor (config, architecture,
    quantization method, weight files and their headers, tokenizer files); raises our errors.
    Also what `llmquant push` runs, so that nothing that would not load gets published."""
    config = read_config(folder)
    quantization_config = check_quantization(config, where)
    check_architecture(config, where, trust_remote_code)
    weights = check_weights(folder, allow_pickle, where)
    if not has_tokenizer_files(folder):
        raise CorruptCheckpointError(
            f"{where} has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json). Copy "
            "the tokenizer files of the original model into the folder; save_pretrained of a "
            "tokenizer writes them."
        )
    return CheckedFolder(config=config, quantization_config=quantization_config, weights=weights)


def _load_folder(source: ModelSource, dtype: "torch.dtype", device: "torch.device",
                 allow_pickle: bool, trust_remote_code: bool) -> LoadedModel:
    folder = source.path
    where = _where(source)
    checked = check_model_folder(folder, where, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    config, quantization_config, weights = checked.config, checked.quantization_config, checked.weights
    tokenizer = load_tokenizer(folder, trust_remote_code)
    if quantization_config is not None:
        # Our own quantized folders: rebuilt by llmquant's loader, which knows their tensor layout.
        from llmquant.checkpoint.load import load_quantized_model

        model = load_quantized_model(folder, config, dtype, device)
    else:
        model = _load_float_model(folder, where, dtype, weights.format == "safetensors", trust_remote_code)
    return LoadedModel(model=model.to(device).eval(), tokenizer=tokenizer, source=source,
                       source_dtype=stored_dtype(config, weights.stored_dtypes),
                       quantization_config=quantization_config)


def _stream_folder(source: ModelSource, dtype: "torch.dtype", device: "torch.device",
                   trust_remote_code: bool) -> LoadedModel:
    from llmquant.arch.experts import linearize
    from llmquant.arch.registry import model_spec
    from llmquant.checkpoint.load import build_skeleton, load_generation_config, quantized_skeleton
    from llmquant.loading.layer_stream import LayerStream

    folder, where = source.path, _where(source)
    # allow_pickle only to learn the format: pickle weights are refused below either way.
    checked = check_model_folder(folder, where, allow_pickle=True, trust_remote_code=trust_remote_code)
    if checked.weights.format != "safetensors":
        raise InvalidConfigError(f"{where} stores its weights as pickle files; a layer-by-layer (streamed) run "
                                 "reads safetensors only. Run without --stream.")
    if checked.quantization_config is not None:
        model = quantized_skeleton(folder, checked.config, dtype)
    else:
        model = build_skeleton(checked.config, dtype)
        linearize(model, model_spec(model).experts)
    load_generation_config(model, folder)
    weights = LayerStream(folder, model.eval(), device)
    return LoadedModel(model=model, tokenizer=load_tokenizer(folder, trust_remote_code), source=source,
                       source_dtype=stored_dtype(checked.config, checked.weights.stored_dtypes),
                       quantization_config=checked.quantization_config, weights=weights)


def load_tokenizer(folder: Path, trust_remote_code: bool) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exception on bad JSON
        raise CorruptCheckpointError(
            f"The tokenizer files in {folder} cannot be loaded ({type(e).__name__}: {_first_line(e)}). "
            "Check that they are complete, or copy them again from the original model."
        ) from None


def _load_float_model(folder: Path, where: str, dtype: "torch.dtype", use_safetensors: bool,
                      trust_remote_code: bool) -> "PreTrainedModel":
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=use_safetensors,
            trust_remote_code=trust_remote_code, output_loading_info=True,
        )
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(
            f"transformers could not load the weights of {where}: {_first_line(e)}"
        ) from None
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        raise CorruptCheckpointError(
            f"The weights of {where} do not match its config.json: {_first_line(e)}. The config and "
            "the weights come from different models; restore the matching config.json."
        ) from None
    # transformers fills weights absent from the checkpoint with random values and only logs it;
    # a model that silently runs on random weights is worse than an error.
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k)
                        for k in info.get("mismatched_keys") or ())
    if missing or mismatched:
        names = missing or mismatched
        what = "lacks" if missing else "has wrongly shaped"
        raise CorruptCheckpointError(
            f"{where} {what} {len(names)} weights its config.json calls for (e.g. "
            f"{', '.join(names[:_SHOWN_NAMES])}); loading it would leave them random. The weights and "
            "config.json come from different models or saves: re-download or re-save the checkpoint."
        )
    return model


def _where(source: ModelSource) -> str:
    if source.kind == "hub":
        return f"The Hub model {source.describe()} (cached at {source.path})"
    if source.kind == "demo":
        return f"The demo model folder {source.path}"
    return f"The folder {source.path}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
