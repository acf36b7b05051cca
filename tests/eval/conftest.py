"""Fixtures for the evaluation tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run the tiny model on one thread for the module, restoring the setting afterwards.

    The tiny model gains nothing from a second thread, and on a busy 2-core machine two
    OpenMP threads competing with other processes made a 1-second training loop take 45.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
