"""Window planning: which tokens are read and which are scored."""

from __future__ import annotations

from collections import Counter

import pytest

from llmquant.eval.windows import batches_of_equal_shape, plan_windows
from llmquant.errors import InvalidConfigError


def _scored(windows):
    return Counter(p for w in windows for p in range(w.first_scored, w.end))


@pytest.mark.parametrize("num_tokens,window,stride", [(1000, 128, 32), (1000, 100, 99), (257, 64, 1)])
def test_overlapping_windows_score_every_token_but_the_first_exactly_once(num_tokens, window, stride):
    windows = plan_windows(num_tokens, window, stride)
    assert _scored(windows) == Counter(range(1, num_tokens))
    for w in windows:
        assert w.length <= window and w.first_scored > w.begin
    # Every scored token after the first window sees at least window - stride tokens of context.
    assert all(w.first_scored - w.begin >= window - stride for w in windows[1:])


def test_non_overlapping_windows_skip_each_window_start():
    windows = plan_windows(1000, 256, 256)
    assert [(w.begin, w.end) for w in windows] == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    scored = _scored(windows)
    assert set(scored) == set(range(1000)) - {0, 256, 512, 768}
    assert sum(scored.values()) == 1000 - len(windows)


def test_window_longer_than_the_stream_is_one_window():
    windows = plan_windows(50, 1024, 1024)
    assert len(windows) == 1 and (windows[0].begin, windows[0].end, windows[0].first_scored) == (0, 50, 1)


def test_batches_never_mix_shapes():
    windows = plan_windows(1000, 128, 64)
    batches = batches_of_equal_shape(windows, batch_size=4)
    assert [w for b in batches for w in b] == windows
    for batch in batches:
        assert len(batch) <= 4
        assert len({(w.length, w.num_scored) for w in batch}) == 1
    assert len(batches[0]) == 1  # the first window scores more tokens than the rest


@pytest.mark.parametrize("window,stride", [(1, 1), (128, 0), (128, 129)])
def test_impossible_windows_are_rejected(window, stride):
    with pytest.raises(InvalidConfigError):
        plan_windows(1000, window, stride)
