"""Give memory that Python and torch have freed back to the operating system.

Building the engine's fast paths (the probe forwards, fused projections, kernel layouts, the
INT8 lm_head copy) allocates several hundred MB that is freed again at once, but glibc's
allocator keeps such freed memory in its heap until `malloc_trim` (a few hundred MB for the
demo W4A16 model). A streamed quantize run frees each decoder layer after it; without the trim
the heap kept a few MB of every layer (the demo model's RSS grew 270 -> 410 MB over 30 layers).
Elsewhere (macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> bool:
    """malloc_trim(0) where glibc has it; True when memory was returned."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
