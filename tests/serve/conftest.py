"""Fixtures for the serving tests: an engine over the tiny model, and real server processes."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

import llmquant.eval.server_process as eval_server

STARTUP_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from llmquant import load_model

    return load_model(tiny_model_dir, dtype="float32")


@pytest.fixture
def engine(tiny_loaded):
    from llmquant.serve.engine import Engine

    eng = Engine(tiny_loaded, max_batch_size=8, max_waiting=16)
    yield eng
    eng.shutdown(drain=False, timeout=10)


class ServerProcess(eval_server.ServerProcess):
    """`llmquant serve MODEL --dtype float32 ARGS...` in a child process on a free local port;
    `base_url` is the server's root (tests add /v1 or /health themselves)."""

    def __init__(self, model: Path, *args: str, env: dict | None = None):
        super().__init__(model, "--dtype", "float32", *args, env=env, startup_timeout=STARTUP_TIMEOUT_S)
        self.base_url = self.root_url

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


@pytest.fixture(scope="session")
def start_server():
    """Start `llmquant serve MODEL ARGS...` (a `ServerProcess`); stopped at the end of the session."""
    started: list[ServerProcess] = []

    def start(model: Path, *args: str, env: dict | None = None) -> ServerProcess:
        started.append(ServerProcess(model, *args, env=env))
        return started[-1]

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def server(tiny_model_dir):
    """A plain server over the tiny model (context 256 tokens)."""
    srv = ServerProcess(tiny_model_dir, "--max-model-len", "256", "--served-model-name", "tiny")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)

