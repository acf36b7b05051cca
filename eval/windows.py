"""Which tokens each sliding window feeds the model and which of them it scores.

This is the scheme of the transformers guide "Perplexity of fixed-length models":
window k reads tokens [k*stride, k*stride + window) and scores only the tokens the
previous window did not reach, so each token is scored at most once and with as much
context as the window allows. A token is scored by predicting it from the tokens before
it *in the same window*, so the first token of a window has nothing to be predicted
from and is never scored. Consequences:

* the first token of the stream is never scored;
* stride < window: every other token is scored exactly once, with at least
  window - stride tokens of context;
* stride == window (non-overlapping, the default): the first token of every window is
  not scored, T - number_of_windows tokens are.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmquant.errors import InvalidConfigError


@dataclass(frozen=True)
class Window:
    """Read tokens [begin, end) and score the tokens at positions [first_scored, end)."""

    begin: int
    end: int
    first_scored: int

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def num_scored(self) -> int:
        return self.end - self.first_scored


def plan_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """The windows covering a stream of `num_tokens` tokens."""
    if window < 2:
        raise InvalidConfigError(f"window must be at least 2 tokens, not {window}.")
    if not 1 <= stride <= window:
        raise InvalidConfigError(
            f"stride must be between 1 and the window ({window}), not {stride}: a stride "
            "larger than the window would skip tokens."
        )
    if num_tokens < 2:
        raise InvalidConfigError(
            f"Perplexity needs at least 2 tokens (one to predict from, one to score); got {num_tokens}."
        )
    windows: list[Window] = []
    previous_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        first_scored = max(previous_end, begin + 1)
        if first_scored < end:
            windows.append(Window(begin, end, first_scored))
        previous_end = end
        if end == num_tokens:
            break
    return windows


def batches_of_equal_shape(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows grouped up to `batch_size`, never mixing lengths or scored counts.

    Equal shapes need no padding (so no attention mask and no padding token, and a
    batched result equals the unbatched one) and let one `logits_to_keep` serve the batch.
    """
    if batch_size < 1:
        raise InvalidConfigError(f"batch_size must be at least 1, not {batch_size}.")
    batches: list[list[Window]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if (last is not None and len(last) < batch_size and last[0].length == w.length
                and last[0].first_scored - last[0].begin == w.first_scored - w.begin):
            last.append(w)
        else:
            batches.append([w])
    return batches
