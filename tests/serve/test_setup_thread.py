"""`run_in_setup_thread`: the work runs in a thread that has ended when the call returns, and its
result or exception reaches the caller unchanged (serve() relies on both)."""

from __future__ import annotations

import threading

import pytest

from llmquant.errors import SourceNotFoundError
from llmquant.serve.setup_thread import run_in_setup_thread


def test_the_result_comes_back_and_the_thread_has_ended():
    seen = {}

    def build():
        seen["thread"] = threading.current_thread()
        return 42

    assert run_in_setup_thread(build) == 42
    assert seen["thread"] is not threading.current_thread()
    assert not seen["thread"].is_alive()


def test_an_error_is_raised_in_the_caller_with_its_type_and_message():
    def build():
        raise SourceNotFoundError("no such model: ./nowhere")

    with pytest.raises(SourceNotFoundError, match="no such model: ./nowhere"):
        run_in_setup_thread(build)
