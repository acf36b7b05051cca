"""A prefill group's forward passes: left-padded prompts, started after their cached prefix, run in chunks.

The engine prefills the prompts it admits together (`PrefillJob`): one pass over the weights for
every row. Two things make a job more than one forward pass:

- Prefix caching (prefix_cache.py): a row whose prompt starts with stored blocks need not
  compute them. Rows stay right-aligned in contiguous columns (left padding only: sliding-window
  masks and the running batch rely on it), so every row computes the same last `T` columns, T
  the largest number of tokens any row still has to compute (`plan`); a row with fewer new
  tokens recomputes some cached ones in columns that would otherwise be padding, at no extra
  cost in the padded forward. The columns before those hold the reused keys and values.
- Chunked prefill: the remaining columns are computed in chunks that fit the engine's token
  budget (`max_prefill_tokens` padded tokens per step), each chunk a forward with the earlier
  chunks' keys and values as past. Between chunks the engine runs a decode step for the running
  batch, so a long prompt does not stall the streams that are already generating.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmquant.serve import kv_cache


def plan(lengths: list[int], found: list[int]) -> tuple[int, list[int]]:
    """Given each row's prompt length and how many of its first tokens the prefix cache holds
    (less than its length), the column where the group's computed part starts and how many
    cached tokens each row reuses (right-aligned before that column)."""
    computed = max(n - f for n, f in zip(lengths, found))  # every row computes its last `computed` tokens
    return max(lengths) - computed, [max(0, n - computed) for n in lengths]


class PrefillJob:
    """The prompts of `seqs`, left-padded to the longest (columns 0..width), with `past` (per
    cache layer, keys and values (G, H, start, D)) already holding the first `start` columns."""

    def __init__(self, seqs: list, device, past: list[tuple[Tensor, Tensor]] | None = None,
                 all_logits: bool = False):
        self.seqs = list(seqs)
        lengths = [len(s.prompt_ids) for s in self.seqs]
        self.width = max(lengths)
        self.pads = [self.width - n for n in lengths]
        self.ids = torch.tensor([[0] * p + s.prompt_ids for p, s in zip(self.pads, self.seqs)], device=device)  # (G, W)
        pads = torch.tensor(self.pads, device=device)
        self.mask = (torch.arange(self.width, device=device)[None] >= pads[:, None]).long()  # (G, W) 1 on tokens
        self.positions = (self.mask.cumsum(dim=1) - 1).clamp(min=0)  # each row counts from its own first token
        self.cache = kv_cache.new_cache()
        for keys, values in past or []:
            layer = kv_cache.GrowingLayer()
            layer.set(keys, values)
            self.cache.layers.append(layer)
        self.done = kv_cache.cache_length(self.cache)  # columns whose keys and values are in the cache
        self.all_logits = all_logits  # prompt logprobs: logits at every position (such a job reuses nothing)
        self._logits: list[Tensor] = []
        self.skipped = False  # passed over in the last step: goes first in the next

    @property
    def remaining(self) -> int:
        """Padded tokens still to compute."""
        return len(self.seqs) * (self.width - self.done)

    def columns(self, budget: int) -> int:
        """The next chunk's width within `budget` padded tokens (at least one column)."""
        return min(self.width - self.done, max(1, budget // len(self.seqs)))

    def run(self, forward, columns: int) -> Tensor | None:
        """Compute the next `columns` columns. When that completes the prompts: the logits, (G, W, V)
        with `all_logits`, else (G, 1, V) of the last position; None before."""
        end = self.done + columns
        mask = self.mask[:, :end] if any(self.pads) else None
        logits = forward(self.ids[:, self.done:end], self.positions[:, self.done:end], mask, self.cache,
                         self.all_logits)  # (G, columns or 1, V)
        self.done = end
        if self.all_logits:
            self._logits.append(logits)
        if end < self.width:
            return None
        return torch.cat(self._logits, dim=1) if self.all_logits else logits

    def keep(self, rows: list[int]) -> None:
        """Only `rows` go on (the others were cancelled)."""
        self.seqs = [self.seqs[i] for i in rows]
        self.pads = [self.pads[i] for i in rows]
        if not rows:
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.ids.device)
        self.ids, self.mask, self.positions = self.ids[index], self.mask[index], self.positions[index]
        self._logits = [x[index] for x in self._logits]
        if self.cache.layers:
            self.cache = kv_cache.keep_rows(self.cache, rows)
