"""The built-in offline corpus: the English reference prose that ships inside CPython.

`pydoc_data.topics.topics` maps ~80 topic names to the text `help()` shows (about
465,000 characters of technical English: the language reference and library chapters on
statements, types and special methods). It is always installed, so calibration and
perplexity work with no network and no extra download. The text changes between Python
minor versions, which is why the description names the version: compare perplexities
measured on the same one.
"""

from __future__ import annotations

import functools
import sys


@functools.lru_cache(maxsize=1)
def builtin_documents() -> tuple[str, ...]:
    """One document per topic, in sorted topic-name order (a fixed, reproducible order)."""
    from pydoc_data.topics import topics

    return tuple(topics[name] for name in sorted(topics))


def builtin_description() -> str:
    return f"builtin corpus (CPython {sys.version_info.major}.{sys.version_info.minor} pydoc topics)"
