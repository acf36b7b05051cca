"""Negative log-likelihood of the scored tokens of each window, computed from logits.

We compute NLL ourselves (float32 log_softmax + gather) instead of averaging the model's
`loss`: the loss is a mean over a count we would have to reconstruct (the transformers
guide's own count is off by one per window when stride < window), and it is computed in
the model's dtype. Summing per-token NLLs keeps token counts exact and windows of
different sizes weighted correctly.

The pieces (`window_ids`, `logit_positions`, `token_nll`, `NllTally`) are shared with the
streamed run (eval/streamed_scoring.py), which computes the same logits a layer at a time.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from llmquant.eval.windows import Window, batches_of_equal_shape


@dataclass
class WindowScores:
    """Total NLL (nats) and scored-token count over all windows, plus each window's mean NLL."""

    nll_sum: float
    num_scored: int
    per_window_nll: list[float]


def model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


@functools.lru_cache(maxsize=32)
def accepts_logits_to_keep(forward_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(forward_type.forward).parameters


def window_ids(ids: torch.Tensor, batch: list[Window]) -> torch.Tensor:
    """The token ids of a batch of equally shaped windows, (windows, length)."""
    return torch.stack([ids[w.begin:w.end] for w in batch])


def logit_positions(num_scored: int) -> int:
    """How many positions at the end of a window need logits: the `num_scored` that predict the
    scored tokens, and the last, which predicts past the window (kept so that the output head
    sees the very rows it sees in a `logits_to_keep` forward, then dropped)."""
    return num_scored + 1


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, num_scored: int) -> torch.Tensor:
    """Per-token NLL (batch, num_scored) from the logits of a window's last `logit_positions` positions."""
    log_probs = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    targets = input_ids[:, -num_scored:]
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def window_nll(model: torch.nn.Module, input_ids: torch.Tensor, num_scored: int) -> torch.Tensor:
    """Per-token NLL (batch, num_scored) of the last `num_scored` tokens of each row.

    Row i predicts input_ids[i, -num_scored:] from everything before them in the row.
    """
    length = input_ids.shape[1]
    if not 1 <= num_scored < length:
        raise ValueError(f"num_scored must be in [1, {length - 1}], got {num_scored}")
    # Logits at positions [length-num_scored-1, length-1) predict the scored tokens; the
    # last position predicts past the window. logits_to_keep skips the lm_head (the
    # largest matmul in a small model) on positions nobody reads.
    keep = logit_positions(num_scored)
    kwargs = {"use_cache": False}
    if accepts_logits_to_keep(type(model)):
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, **kwargs).logits[:, -keep:, :]
    return token_nll(logits, input_ids, num_scored)


class NllTally:
    """Adds up the per-token NLLs of window batches as they are scored (float64 sums, each
    window's mean kept in stream order), with a progress bar showing the perplexity so far."""

    def __init__(self, num_windows: int, progress: bool, desc: str = "perplexity"):
        self.nll_sum = 0.0
        self.num_scored = 0
        self.per_window: list[float] = []
        self.bar = tqdm(total=num_windows, desc=desc, unit="window", file=sys.stderr, disable=not progress,
                        dynamic_ncols=True)

    def add(self, nll: torch.Tensor) -> None:
        """Count one batch: `nll` (windows, num_scored) as `token_nll` gives it."""
        for row in nll.double():
            self.nll_sum += float(row.sum())
            self.num_scored += row.numel()
            self.per_window.append(float(row.mean()))
        self.bar.update(len(nll))
        self.bar.set_postfix(ppl=f"{_exp(self.nll_sum / self.num_scored):.3f}")

    def scores(self) -> WindowScores:
        return WindowScores(nll_sum=self.nll_sum, num_scored=self.num_scored, per_window_nll=self.per_window)

    def __enter__(self) -> NllTally:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def score_windows(model: torch.nn.Module, ids: torch.Tensor, windows: list[Window], *,
                  batch_size: int = 1, progress: bool = True) -> WindowScores:
    """Run every window through `model` and add up the NLL of its scored tokens."""
    device = model_device(model)
    with torch.inference_mode(), NllTally(len(windows), progress) as tally:
        for batch in batches_of_equal_shape(windows, batch_size):
            tally.add(window_nll(model, window_ids(ids, batch).to(device), batch[0].num_scored))
    return tally.scores()


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")
