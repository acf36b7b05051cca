"""Training text for distillation: every whole `seq_len` window of a dataset's training split
(the calibration split: the held-out evaluation text is never trained on), and the order in
which the trainer reads them, a pure function of (seed, epoch) so a resumed run reads exactly
what the interrupted one would have."""

from __future__ import annotations

import os

import torch

from llmquant.errors import DataSourceError


def training_windows(tokenizer, dataset: str | os.PathLike | None = None, *, seq_len: int = 512,
                     text_field: str = "text", config_name: str | None = None,
                     max_tokens: int | None = None) -> torch.Tensor:
    """(N, seq_len) int64: consecutive non-overlapping windows of the training split."""
    from llmquant.data.splits import load_text_split
    from llmquant.data.tokenize import tokenize_split

    split = load_text_split(dataset, "calibration", config_name=config_name, text_field=text_field)
    ids = tokenize_split(tokenizer, split, max_tokens=max_tokens).ids
    n = ids.numel() // seq_len
    if n < 1:
        raise DataSourceError(f"{split.describe()} holds {ids.numel():,} tokens, fewer than one window of "
                              f"{seq_len}; lower seq_len or use a larger dataset.")
    return ids[: n * seq_len].reshape(n, seq_len).clone()


def epoch_order(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of item indices read in `epoch`."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(num_items: int, batch_size: int, seed: int, position: int) -> torch.Tensor:
    """Indices of the `position`-th micro-batch of the stream (epochs follow one another;
    a partial last batch of an epoch is skipped so every batch has the same shape)."""
    per_epoch = num_items // batch_size
    if per_epoch < 1:
        raise DataSourceError(f"{num_items} training windows do not fill one batch of {batch_size}.")
    epoch, slot = divmod(position, per_epoch)
    return epoch_order(num_items, seed, epoch)[slot * batch_size:(slot + 1) * batch_size]
