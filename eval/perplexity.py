"""Sliding-window perplexity of a causal LM on held-out text or a file of your own.

    from llmquant.eval import perplexity
    result = perplexity("HuggingFaceTB/SmolLM2-135M", max_tokens=32_768)
    print(result.perplexity, result.bits_per_byte, result.method["scored"])

    from llmquant.data import EvalData
    result = perplexity("out/", EvalData(dataset="notes.txt", window=512))  # all of notes.txt

    result = perplexity("org/70b-model", stream=True)  # read one decoder layer at a time

The window scheme is the transformers guide's (see `eval.windows`); the NLL is summed
per token in float32 (see `eval.scoring`). Perplexity is per *token*, so it depends on
the tokenizer; `bits_per_byte` normalizes by the UTF-8 size of the text instead and is
comparable across tokenizers on the same evaluation text.

`stream=True` computes the same numbers with the model read from its safetensors files one
decoder layer at a time (see `eval.streamed_scoring`), for a model larger than memory.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from llmquant.data.eval_data import EvalData
from llmquant.data.evaluation import describe_scored, scored_text
from llmquant.data.tokenize import tokenize_split
from llmquant.errors import InvalidConfigError
from llmquant.eval.local_model import DEFAULT_MAX_WINDOW, context_length, dtype_name, resolve_model
from llmquant.eval.scoring import model_device, score_windows
from llmquant.eval.streamed_scoring import is_streamed, load_streamed, score_windows_streamed
from llmquant.eval.windows import plan_windows


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
    # Wall time of the forward passes (model loading and tokenizing excluded; a streamed run's
    # reading of each layer's weights is part of its passes, so it is included).
    seconds: float
    model: str
    num_bytes: int = 0  # UTF-8 bytes of the evaluated text
    per_window_unit: str = "mean NLL (nats/token)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def perplexity(model: Any = None, data: EvalData | None = None, *, stream: bool = False, progress: bool = True,
               **options: Any) -> PerplexityResult:
    """Perplexity of `model` on the text `data` selects.

    model: a source for `llmquant.loading.load_model` (Hub id, folder, .gguf, None for the
        demo model), an already-loaded `LoadedModel`, or a `(model, tokenizer)` pair. The
        loading options of `data` (revision, dtype, device, allow_pickle, trust_remote_code)
        only apply when a source is given.
    data: an `llmquant.data.EvalData`: which text (dataset, config_name, text_field, split,
        max_tokens; by default a named file is scored whole, the built-in corpus and Hub
        datasets on their held-out split), and the windows:
        window: tokens per forward pass (default: the model's context length, at most 1024);
        stride: tokens the window advances by (default: window, i.e. non-overlapping windows);
            a smaller stride gives each scored token more context and costs window/stride
            times more compute;
        batch_size: windows per forward pass.
    stream: read the model from its safetensors files one decoder layer at a time, so that memory
        holds one layer's weights and every window's hidden states, not the model (same result).
        Needs a source (Hub id, folder) or a LoadedModel from `load_model(stream=True)` (always
        scored this way); a GGUF file, pickle weights or a model already in memory are refused.
    options: any of those fields as keyword arguments (`max_tokens=8192`), applied over `data`.
    """
    data = EvalData.build(data, **options)
    # Read the text before loading the model: a missing file or an unreachable Hub
    # dataset should fail in a second, not after a multi-gigabyte model load.
    text_split = scored_text(data)
    streamed = load_streamed(model, **data.load_options()) if stream or is_streamed(model) else None
    if streamed is not None:
        lm, tokenizer, description = streamed.model, streamed.tokenizer, streamed.source.describe()
    else:
        lm, tokenizer, description = resolve_model(model, **data.load_options())
    context = context_length(lm)
    window = data.window
    if window is None:
        window = min(context or DEFAULT_MAX_WINDOW, DEFAULT_MAX_WINDOW)
    elif context is not None and window > context:
        raise InvalidConfigError(
            f"window {window} is longer than the model's context length ({context} tokens); "
            f"use --window {context} or less."
        )
    stride = data.stride if data.stride is not None else window
    tokens = tokenize_split(tokenizer, text_split, max_tokens=data.max_tokens)
    windows = plan_windows(tokens.num_tokens, window, stride)

    was_training = lm.training
    lm.eval()
    start = time.perf_counter()
    try:
        if streamed is not None:
            scores = score_windows_streamed(lm, streamed.weights, tokens.ids, windows, batch_size=data.batch_size,
                                            progress=progress)
        else:
            scores = score_windows(lm, tokens.ids, windows, batch_size=data.batch_size, progress=progress)
    finally:
        lm.train(was_training)
    seconds = time.perf_counter() - start

    nll_per_token = scores.nll_sum / scores.num_scored
    return PerplexityResult(
        perplexity=math.exp(nll_per_token),
        nll_per_token=nll_per_token,
        num_tokens_scored=scores.num_scored,
        bits_per_byte=scores.nll_sum / math.log(2) / tokens.num_bytes,
        per_window=scores.per_window_nll,
        method={
            "dataset": tokens.dataset,
            "split": tokens.split,
            "data": tokens.description,
            "scored": describe_scored(tokens),
            "num_tokens": tokens.num_tokens,
            "max_tokens": data.max_tokens,
            "window": window,
            "stride": stride,
            "num_windows": len(windows),
            "batch_size": data.batch_size,
            "normalization": "token",
            "bos": False,
            "dtype": dtype_name(lm),
            "device": str(streamed.weights.device if streamed is not None else model_device(lm)),
            # Read one decoder layer at a time from the files (same windows, same arithmetic).
            "streamed": streamed is not None,
        },
        seconds=seconds,
        model=description,
        num_bytes=tokens.num_bytes,
    )
