"""`serve(...)`: bind the port, load a model, start the engine, run the HTTP server until SIGINT/SIGTERM.

The port is bound (and listening) before anything is loaded: a port already in use fails in a
moment with a message naming it, not after a model load of minutes, and no other process can
take the port while the model loads. uvicorn is handed that very socket.

Shutdown is graceful: on the signal the listening socket closes (new connections are refused),
new requests on open connections get 503, and requests in flight run to completion (up to
`shutdown_timeout` seconds) before the engine stops.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from pathlib import Path

from llmquant.errors import InvalidConfigError, LLMQuantError
from llmquant.serve.limits import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAITING, DEFAULT_PREFIX_CACHE_TOKENS

API_KEY_ENV = "LLMQUANT_API_KEY"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_SHUTDOWN_TIMEOUT_S = 30

LISTEN_BACKLOG = 2048  # uvicorn's default

log = logging.getLogger(__name__)


class PortUnavailableError(LLMQuantError):
    """The address to serve on cannot be bound: the port is in use, privileged, or the host is not ours."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port and listening (connections wait in the backlog until
    the server accepts them); PortUnavailableError when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR, as uvicorn sets it: a restart need not wait out the last run's TIME_WAIT.
        # Listening at once matters with it: two sockets with SO_REUSEADDR may both bind a port
        # until one of them listens.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        other = port + 1 if port < 65535 else DEFAULT_PORT
        if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
            raise PortUnavailableError(f"Cannot serve on {host}: it is not an address of this machine. Nothing "
                                       f"was loaded. Pick another with --host (e.g. --host {DEFAULT_HOST}, or "
                                       "0.0.0.0 for every interface).") from None
        if e.errno == errno.EADDRINUSE:
            why = f"port {port} on {host} is already in use (another server is listening there)"
        elif e.errno == errno.EACCES:
            why = f"binding port {port} on {host} is not permitted (ports below 1024 need privileges)"
        else:
            why = f"cannot listen on {host}:{port} ({e.strerror or e})"
        raise PortUnavailableError(f"Cannot serve: {why}. Nothing was loaded. Pick another port with --port "
                                   f"(e.g. --port {other}), or stop the process that holds this one.") from None
    except BaseException:
        sock.close()
        raise
    return sock


def default_model_name(source, loaded) -> str:
    """What /v1/models lists and requests must name: the Hub id, or the folder/file name."""
    name = getattr(loaded.source, "name", None) or str(source)
    return Path(name).name if loaded.source.kind != "hub" else name


def serve(model=None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None,
          served_model_name: str | None = None, max_model_len: int | None = None,
          max_batch_size: int = DEFAULT_MAX_BATCH, max_waiting: int = DEFAULT_MAX_WAITING,
          revision: str | None = None, dtype: str = "auto", device: str | None = None, allow_pickle: bool = False,
          trust_remote_code: bool = False, shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S, log_level: str = "info",
          ready_message: bool = True, lean_forward: bool = True, max_prefill_tokens: int | None = None,
          prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS) -> None:
    """Serve `model` (any source `llmquant.load_model` takes; None: the demo model) on host:port.
    `max_prefill_tokens` and `prefix_cache_tokens`: see `Engine`."""
    if not 1 <= port <= 65535:
        raise InvalidConfigError(f"--port must be between 1 and 65535, got {port}.")
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    sock = bind_socket(host, port)  # before loading: a taken port fails now, not after the load
    try:
        # Imported only now: they take a second or more (torch, transformers, FastAPI).
        import uvicorn

        from llmquant.loading import load_model
        from llmquant.serve.app import create_app
        from llmquant.serve.engine import Engine
        from llmquant.serve.setup_thread import run_in_setup_thread

        if ready_message:
            print(f"bound {host}:{port}; loading the model...", file=sys.stderr, flush=True)

        def build():
            loaded = load_model(model, revision=revision, dtype=dtype, device=device, allow_pickle=allow_pickle,
                                trust_remote_code=trust_remote_code)
            return loaded, Engine(loaded, max_batch_size=max_batch_size, max_waiting=max_waiting,
                                  max_model_len=max_model_len, lean_forward=lean_forward,
                                  max_prefill_tokens=max_prefill_tokens, prefix_cache_tokens=prefix_cache_tokens)

        # In a thread that ends: the engine's thread is then the only one with OpenMP workers
        # (setup_thread.py says why that makes decoding several times faster on CPU).
        loaded, engine = run_in_setup_thread(build)
        name = served_model_name or default_model_name(model, loaded)
        try:
            app = create_app(engine, name, api_key=api_key)
            config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                    access_log=log_level == "debug", timeout_graceful_shutdown=shutdown_timeout)
            server = _graceful_server(config, app, engine)
            if ready_message:
                where = "all interfaces" if host in ("0.0.0.0", "::") else host
                print(f"serving {name} ({loaded.source.describe()}) on http://{host}:{port}/v1 ({where}); "
                      f"max context {engine.max_model_len} tokens, batch {max_batch_size}"
                      f"{', API key required' if api_key else ''}", file=sys.stderr, flush=True)
            server.run(sockets=[sock])  # the socket bound above: no second bind, no race for the port
        finally:
            engine.shutdown(drain=False, timeout=5)
    finally:
        sock.close()


def _graceful_server(config, app, engine):
    """uvicorn's server, telling the app to refuse new requests as soon as a signal arrives and
    stopping the engine once the requests in flight are done."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.llm.accepting = False  # new requests on kept-alive connections: 503
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            await super().shutdown(sockets)  # waits for in-flight requests (graceful timeout)
            engine.shutdown(drain=True, timeout=5)

    return GracefulServer(config)
