"""Fixtures for the serving tests: an engine over the tiny model, and real server processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 120


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from llmquant import load_model

    return load_model(tiny_model_dir, dtype="float32")


@pytest.fixture
def engine(tiny_loaded):
    from serve.engine import Engine

    eng = Engine(tiny_loaded, max_batch_size=8, max_waiting=16)
    yield eng
    eng.shutdown(drain=False, timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`llmquant serve` in a child process on a free local port."""

    def __init__(self, model: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"llmquant-serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmquant", "serve", str(model), "--port", str(self.port), "--dtype", "float32",
             *args], stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            preexec_fn=_die_with_parent)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start within {STARTUP_TIMEOUT_S}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.log.closed:
            self.log.close()


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


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the test process dies (a crash skips fixture teardown
    and would leave servers running)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
