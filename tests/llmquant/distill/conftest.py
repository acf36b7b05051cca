"""Fixtures for the distillation tests: a 4-layer tiny teacher (layers to drop) on one thread."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from conftest import make_tiny_model_dir  # noqa: E402  (tests/conftest.py: the shared tiny-model builder)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama with 4 layers, hidden 128, 4 heads / 2 KV heads, MLP 256 (bf16 safetensors)."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("teacher") / "tiny-4l", tokenizer=tiny_tokenizer, layers=4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model gains nothing from a second thread, and a busy 2-core machine makes
    # two competing OpenMP threads far slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    from llmquant import load_model

    return load_model(teacher_dir, dtype="float32")


@pytest.fixture(scope="module")
def windows(teacher):
    from llmquant.distill.data import training_windows

    return training_windows(teacher.tokenizer, seq_len=64, max_tokens=64 * 64)
