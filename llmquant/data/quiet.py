"""Silence `datasets` progress bars while we read a dataset we show our own progress for.

"Generating train split: 3 examples" bars for a local file are noise next to our own
messages; the setting is process-wide, so it is restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
