"""Negative log-likelihood of the scored tokens of each window, computed from logits.

We compute NLL ourselves (float32 log_softmax + gather) instead of averaging the model's
`loss`: the loss is a mean over a count we would have to reconstruct (the transformers
guide's own count is off by one per window when stride < window), and it is computed in
the model's dtype. Summing per-token NLLs keeps token counts exact and windows of
different sizes weighted correctly.
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
    keep = num_scored + 1
    kwargs = {"use_cache": False}
    if accepts_logits_to_keep(type(model)):
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, **kwargs).logits[:, -keep:-1, :]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    targets = input_ids[:, -num_scored:]
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def score_windows(model: torch.nn.Module, ids: torch.Tensor, windows: list[Window], *,
                  batch_size: int = 1, progress: bool = True) -> WindowScores:
    """Run every window through `model` and add up the NLL of its scored tokens."""
    device = model_device(model)
    nll_sum = 0.0
    num_scored = 0
    per_window: list[float] = []
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    with torch.inference_mode(), bar:
        for batch in batches_of_equal_shape(windows, batch_size):
            input_ids = torch.stack([ids[w.begin:w.end] for w in batch]).to(device)
            nll = window_nll(model, input_ids, batch[0].num_scored).double()
            for row in nll:
                nll_sum += float(row.sum())
                num_scored += row.numel()
                per_window.append(float(row.mean()))
            bar.update(len(batch))
            bar.set_postfix(ppl=f"{_exp(nll_sum / num_scored):.3f}")
    return WindowScores(nll_sum=nll_sum, num_scored=num_scored, per_window_nll=per_window)


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")
