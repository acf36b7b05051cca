"""A local model for a measurement: from a source, a `LoadedModel` or a (model, tokenizer) pair,
and the facts about it that the window plan needs (context length, dtype).

Shared by `eval.perplexity` and `eval.agreement`; `eval.remote` uses `DEFAULT_MAX_WINDOW`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from llmquant.errors import InvalidConfigError

DEFAULT_MAX_WINDOW = 1024
_CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length",
                        "seq_length")


def resolve_model(model: Any, **load_options: Any) -> tuple[torch.nn.Module, Any, str]:
    """(torch model, tokenizer, description) from a source, a LoadedModel or a pair.

    `load_options` (the keyword arguments of `llmquant.load_model`) only apply to a source.
    """
    from llmquant.loading import LoadedModel, ModelSource, load_model

    if isinstance(model, LoadedModel):
        return model.model, model.tokenizer, model.source.describe()
    if isinstance(model, tuple):
        if len(model) != 2:
            raise InvalidConfigError("A model given as a tuple must be (model, tokenizer).")
        lm, tokenizer = model
        name = getattr(lm, "name_or_path", None) or getattr(getattr(lm, "config", None),
                                                             "_name_or_path", None)
        return lm, tokenizer, str(name or type(lm).__name__)
    if model is not None and not isinstance(model, (str, os.PathLike, ModelSource)):
        raise InvalidConfigError(
            f"model must be a source (Hub id, folder, .gguf file, or None for the demo model), a "
            f"LoadedModel or a (model, tokenizer) pair; got {type(model).__name__}."
        )
    loaded = load_model(model, **load_options)
    return loaded.model, loaded.tokenizer, loaded.source.describe()


def context_length(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position encoding was built for, if it says."""
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):  # multimodal configs keep the LM's in a sub-config
        config = config.get_text_config()
    for key in _CONTEXT_LENGTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(model.parameters()).dtype


def dtype_name(model: torch.nn.Module) -> str:
    return str(model_dtype(model)).removeprefix("torch.")
