"""Build the model and engine in a thread that ends, so the engine's thread is the only one with
a pool of OpenMP workers.

torch's CPU parallelism is OpenMP (libgomp). libgomp keeps one pool of worker threads per thread
that has run parallel work, for as long as that thread lives; once it manages more threads than
there are cores it stops spinning between parallel regions and puts workers to sleep instead,
and a decode step is hundreds of tiny parallel regions. Loading the model and probing the engine
on the main thread left the main thread's pool alive beside the engine's, which made every decode
step wait on those wake-ups: on 2 cores the demo model's W4A16 engine decoded several times slower
than when its thread is the only one (benchmarks/serving.py measures the server). The pool of a
thread that ends goes with it.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def run_in_setup_thread(build: Callable[[], T]) -> T:
    """`build()` run in a new thread that ends before this returns; its result, or its exception
    raised here."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = build()
        except BaseException as exc:  # re-raised in the caller's thread, traceback and all
            outcome["error"] = exc

    # daemon: Ctrl-C during a long load stops the process instead of waiting for the load
    thread = threading.Thread(target=target, name="llmquant-setup", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
