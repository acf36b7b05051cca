"""The text a measurement scores, as one token stream.

Two entry points, with different defaults on purpose:

* `scored_text` / `scored_stream(tokenizer, data)` take an `EvalData` and follow its rule for
  `split` (see `llmquant.data.eval_data`): a local file the user named is scored whole.
* `evaluation_stream` / `evaluation_tokens(tokenizer, dataset, ...)` always give the held-out
  evaluation split, even of a file: they serve calibration/evaluation separation (a quantized
  model checked on text its calibration never saw), where the file is the calibration data.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from llmquant.data.eval_data import EvalData
from llmquant.data.sources import resolve_dataset
from llmquant.data.splits import ALL, DEFAULT_EVAL_FRACTION, HELD_OUT, TextSplit, load_text_split
from llmquant.data.tokenize import TokenStream, tokenize_split

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def scored_text(data: EvalData, eval_fraction: float = DEFAULT_EVAL_FRACTION) -> TextSplit:
    """The documents `data` selects for scoring (read now, before any model is loaded)."""
    split = data.split
    if split is None and resolve_dataset(data.dataset, config_name=data.config_name,
                                         text_field=data.text_field).kind == "file":
        split = ALL  # a user who names a file to score expects the whole file to be scored
    return load_text_split(data.dataset, "evaluation", split=split, config_name=data.config_name,
                           text_field=data.text_field, eval_fraction=eval_fraction)


def scored_stream(tokenizer: PreTrainedTokenizerBase, data: EvalData,
                  eval_fraction: float = DEFAULT_EVAL_FRACTION) -> TokenStream:
    """`scored_text(data)` tokenized, keeping at most `data.max_tokens` tokens."""
    return tokenize_split(tokenizer, scored_text(data, eval_fraction), max_tokens=data.max_tokens)


def describe_scored(stream: TokenStream) -> str:
    """Which part of which text was scored, in a line: "all documents of file notes (2,345 tokens)"."""
    tokens = (f"its first {stream.num_tokens:,} tokens, cut by max_tokens" if stream.truncated
              else f"{stream.num_tokens:,} tokens")
    return f"{stream.split} of {stream.dataset} ({tokens})"


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
    """The held-out evaluation split as a `TokenStream` (ids, UTF-8 bytes covered, description).

    Arguments as for `calibration_batches`, whose text this split never shares; `max_tokens`
    keeps only the first tokens (the rest of the split is not even tokenized).
    """
    data = EvalData(dataset=dataset, max_tokens=max_tokens, text_field=text_field, config_name=config_name,
                    split=split or HELD_OUT)
    return scored_stream(tokenizer, data, eval_fraction)


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
