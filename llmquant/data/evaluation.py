"""The evaluation token stream: the tokenized evaluation split, optionally truncated."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from llmquant.data.splits import DEFAULT_EVAL_FRACTION, load_text_split
from llmquant.data.tokenize import TokenStream, tokenize_split

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def evaluation_stream(
    tokenizer: PreTrainedTokenizerBase,
    dataset: str | os.PathLike | None = None,
    *,
    max_tokens: int | None = None,
    text_field: str = "text",
    config_name: str | None = None,
    split: str | None = None,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
) -> TokenStream:
    """The evaluation split as a `TokenStream` (ids, UTF-8 bytes covered, description).

    Arguments as for `calibration_batches`; `max_tokens` keeps only the first tokens (the
    rest of the split is not even tokenized).
    """
    text_split = load_text_split(dataset, "evaluation", split=split, config_name=config_name,
                                 text_field=text_field, eval_fraction=eval_fraction)
    return tokenize_split(tokenizer, text_split, max_tokens=max_tokens)


def evaluation_tokens(
    tokenizer: PreTrainedTokenizerBase,
    dataset: str | os.PathLike | None = None,
    *,
    max_tokens: int | None = None,
    text_field: str = "text",
    config_name: str | None = None,
    split: str | None = None,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
) -> torch.Tensor:
    """The (T,) int64 ids of the evaluation split; see `evaluation_stream` for its byte size."""
    return evaluation_stream(tokenizer, dataset, max_tokens=max_tokens, text_field=text_field,
                             config_name=config_name, split=split,
                             eval_fraction=eval_fraction).ids
