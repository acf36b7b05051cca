"""Calibration batches: reproducible, non-overlapping token windows of the calibration split.

Windows are whole `seq_len`-token slices of the calibration stream. A seeded random
offset (smaller than `seq_len`) fixes the slot grid, and a seeded permutation picks
`num_samples` distinct slots from it, so the same seed always gives the same windows,
different seeds give different ones, and no token is used twice. When the split is too
short we say so rather than repeat text: repeated calibration data silently overweights
the repeated part in every statistic a quantizer collects.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from llmquant.data.splits import DEFAULT_EVAL_FRACTION, load_text_split
from llmquant.data.tokenize import tokenize_split
from llmquant.errors import DataSourceError, InvalidConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Windows are drawn from at most this many leading tokens of the calibration split (or
# num_samples * seq_len when larger), so a large Hub "train" split costs seconds, not minutes.
CALIBRATION_POOL_TOKENS = 2_000_000


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase,
    dataset: str | os.PathLike | None = None,
    *,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    text_field: str = "text",
    config_name: str | None = None,
    split: str | None = None,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
) -> torch.Tensor:
    """A (num_samples, seq_len) int64 tensor of calibration windows (see the module docstring).

    `dataset`: None/"builtin", a local .txt/.jsonl/.json/.parquet file, or a Hub dataset
    ("name" or "name:config"). `split`: None for the calibration split; "all" for every
    document of a file; a Hub split expression for Hub datasets. Use the same
    `eval_fraction` as the evaluation, or the two splits may overlap.
    """
    if num_samples < 1 or seq_len < 2:
        raise InvalidConfigError(
            f"num_samples must be >= 1 and seq_len >= 2 (got {num_samples} and {seq_len})."
        )
    text_split = load_text_split(dataset, "calibration", split=split, config_name=config_name,
                                 text_field=text_field, eval_fraction=eval_fraction)
    needed = num_samples * seq_len
    stream = tokenize_split(tokenizer, text_split, max_tokens=max(CALIBRATION_POOL_TOKENS, needed))
    return pick_windows(stream.ids, num_samples=num_samples, seq_len=seq_len, seed=seed,
                        description=text_split.describe())


def pick_windows(ids: torch.Tensor, *, num_samples: int, seq_len: int, seed: int,
                 description: str = "the calibration split") -> torch.Tensor:
    """`num_samples` distinct, non-overlapping `seq_len` windows of `ids`, chosen by `seed`."""
    total = int(ids.numel())
    slots = total // seq_len
    if num_samples > slots:
        fits = f"at most {slots:,} samples of {seq_len} tokens fit"
        if total // num_samples >= 32:
            fits += f" (or {num_samples} samples of {total // num_samples:,} tokens)"
        raise DataSourceError(
            f"Not enough calibration text: {description} holds {total:,} tokens with this "
            f"tokenizer, but "
            f"num_samples x seq_len = {num_samples} x {seq_len} = {num_samples * seq_len:,}; "
            f"without repeating text {fits}. Lower num_samples/seq_len or use a larger dataset."
        )
    generator = torch.Generator().manual_seed(seed)
    offset = int(torch.randint(0, total - slots * seq_len + 1, (1,), generator=generator))
    chosen = torch.randperm(slots, generator=generator)[:num_samples]
    starts = offset + chosen * seq_len
    return ids[starts[:, None] + torch.arange(seq_len)].clone()
