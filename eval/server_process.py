"""`llmquant serve` in a child process on a free local port, for measuring a local model online.

A separate process, not a thread: the load generator's event loop and the server's would
otherwise share one interpreter lock and the latencies would measure that contention.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from llmquant.errors import LLMQuantError

STARTUP_TIMEOUT_S = 300


class ServerStartError(LLMQuantError):
    """The server process exited or did not answer /health in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Start with `ServerProcess(source, "--dtype", "float32")`; use as a context manager."""

    def __init__(self, model: str | os.PathLike | None, *args: str, startup_timeout: float = STARTUP_TIMEOUT_S,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.root_url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.root_url + "/v1"
        self.log = tempfile.TemporaryFile("w+", prefix="llmquant-serve-")
        command = [sys.executable, "-m", "llmquant", "serve", *([str(model)] if model is not None else []),
                   "--port", str(self.port), *args]
        # PYTHONPATH travels so a source checkout serves its own code.
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"llmquant serve exited with {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                with urllib.request.urlopen(self.root_url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        self.stop()
        raise ServerStartError(f"llmquant serve did not answer within {startup_timeout:.0f} s: {self.output()[-2000:]}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

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

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when the process that started it dies, so a crashed or
    killed suite never leaves a server holding memory and cores."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
