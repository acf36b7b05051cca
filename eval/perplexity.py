"""Sliding-window perplexity of a causal LM on the evaluation split of a dataset.

    from llmquant.eval import perplexity
    result = perplexity("HuggingFaceTB/SmolLM2-135M", max_tokens=32_768)
    print(result.perplexity, result.bits_per_byte)

The window scheme is the transformers guide's (see `eval.windows`); the NLL is summed
per token in float32 (see `eval.scoring`). Perplexity is per *token*, so it depends on
the tokenizer; `bits_per_byte` normalizes by the UTF-8 size of the text instead and is
comparable across tokenizers on the same evaluation text.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from llmquant.eval.scoring import model_device, score_windows
from llmquant.eval.windows import plan_windows
from llmquant.data.splits import load_text_split
from llmquant.data.tokenize import tokenize_split
from llmquant.errors import InvalidConfigError

DEFAULT_MAX_WINDOW = 1024
_CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length",
                        "seq_length")


@dataclass
class PerplexityResult:
    """What `perplexity` measured, and exactly how (see `method`)."""

    perplexity: float
    nll_per_token: float  # mean NLL of the scored tokens, nats
    num_tokens_scored: int
    # Total NLL / ln 2 / UTF-8 bytes of the evaluated text. Unscored tokens (one per
    # non-overlapping window) still count in the bytes: about 1/window low, the same for
    # every model evaluated with the same window.
    bits_per_byte: float
    per_window: list[float]  # mean NLL (nats/token) of each window, in stream order
    method: dict[str, Any]
    seconds: float  # wall time of the forward passes (model loading and tokenizing excluded)
    model: str
    num_bytes: int = 0  # UTF-8 bytes of the evaluated text
    per_window_unit: str = "mean NLL (nats/token)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def perplexity(
    model: Any = None,
    *,
    dataset: str | os.PathLike | None = None,
    max_tokens: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    text_field: str = "text",
    config_name: str | None = None,
    split: str | None = None,
    revision: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on the evaluation split of `dataset`.

    model: a source for `llmquant.loading.load_model` (Hub id, folder, .gguf, None for the
        demo model), an already-loaded `LoadedModel`, or a `(model, tokenizer)` pair. The
        loading options (revision, dtype, device, allow_pickle, trust_remote_code) only
        apply when a source is given.
    dataset, text_field, config_name, split: which text; see `llmquant.data`.
    max_tokens: evaluate only the first tokens of the split (default: all of it).
    window: tokens per forward pass (default: the model's context length, at most 1024).
    stride: tokens the window advances by (default: window, i.e. non-overlapping windows).
        A smaller stride gives each scored token more context and costs window/stride
        times more compute.
    batch_size: windows per forward pass.
    """
    _check_options(max_tokens=max_tokens, window=window, stride=stride, batch_size=batch_size)
    # Read the text before loading the model: a missing file or an unreachable Hub
    # dataset should fail in a second, not after a multi-gigabyte model load.
    text_split = load_text_split(dataset, "evaluation", split=split, config_name=config_name,
                                 text_field=text_field)
    lm, tokenizer, description = _resolve_model(
        model, revision=revision, dtype=dtype, device=device, allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    context = context_length(lm)
    if window is None:
        window = min(context or DEFAULT_MAX_WINDOW, DEFAULT_MAX_WINDOW)
    elif context is not None and window > context:
        raise InvalidConfigError(
            f"window {window} is longer than the model's context length ({context} tokens); "
            f"use --window {context} or less."
        )
    stride = stride if stride is not None else window
    stream = tokenize_split(tokenizer, text_split, max_tokens=max_tokens)
    windows = plan_windows(stream.num_tokens, window, stride)

    was_training = lm.training
    lm.eval()
    start = time.perf_counter()
    try:
        scores = score_windows(lm, stream.ids, windows, batch_size=batch_size, progress=progress)
    finally:
        lm.train(was_training)
    seconds = time.perf_counter() - start

    nll_per_token = scores.nll_sum / scores.num_scored
    return PerplexityResult(
        perplexity=math.exp(nll_per_token),
        nll_per_token=nll_per_token,
        num_tokens_scored=scores.num_scored,
        bits_per_byte=scores.nll_sum / math.log(2) / stream.num_bytes,
        per_window=scores.per_window_nll,
        method={
            "dataset": stream.dataset,
            "split": stream.split,
            "data": stream.description,
            "num_tokens": stream.num_tokens,
            "max_tokens": max_tokens,
            "window": window,
            "stride": stride,
            "num_windows": len(windows),
            "batch_size": batch_size,
            "normalization": "token",
            "bos": False,
            "dtype": str(_model_dtype(lm)).removeprefix("torch."),
            "device": str(model_device(lm)),
        },
        seconds=seconds,
        model=description,
        num_bytes=stream.num_bytes,
    )


def _check_options(*, max_tokens: int | None, window: int | None, stride: int | None,
                   batch_size: int) -> None:
    """Reject impossible numbers before any data or model is loaded."""
    if max_tokens is not None and max_tokens < 2:
        raise InvalidConfigError(f"max_tokens must be at least 2 (one token to predict from, one "
                                 f"to score), not {max_tokens}.")
    if window is not None and window < 2:
        raise InvalidConfigError(f"window must be at least 2 tokens, not {window}.")
    if stride is not None and (stride < 1 or (window is not None and stride > window)):
        raise InvalidConfigError(
            f"stride must be at least 1 and at most the window ({window}), not {stride}: a stride "
            "larger than the window would skip tokens."
        )
    if batch_size < 1:
        raise InvalidConfigError(f"batch_size must be at least 1, not {batch_size}.")


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


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(model.parameters()).dtype


def _resolve_model(model: Any, **load_options: Any) -> tuple[torch.nn.Module, Any, str]:
    """(torch model, tokenizer, description) from a source, a LoadedModel or a pair."""
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
