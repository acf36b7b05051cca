"""`serve(...)`: load a model, start the engine, run the HTTP server until SIGINT/SIGTERM.

Shutdown is graceful: on the signal the listening socket closes (new connections are refused),
new requests on open connections get 503, and requests in flight run to completion (up to
`shutdown_timeout` seconds) before the engine stops.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from llmquant.errors import InvalidConfigError

API_KEY_ENV = "LLMQUANT_API_KEY"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_SHUTDOWN_TIMEOUT_S = 30

log = logging.getLogger(__name__)


def default_model_name(source, loaded) -> str:
    """What /v1/models lists and requests must name: the Hub id, or the folder/file name."""
    name = getattr(loaded.source, "name", None) or str(source)
    return Path(name).name if loaded.source.kind != "hub" else name


def serve(model=None, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None,
          served_model_name: str | None = None, max_model_len: int | None = None, max_batch_size: int = 32,
          max_waiting: int = 256, revision: str | None = None, dtype: str = "auto", device: str | None = None,
          allow_pickle: bool = False, trust_remote_code: bool = False,
          shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S, log_level: str = "info",
          ready_message: bool = True, lean_forward: bool = True) -> None:
    """Serve `model` (any source `llmquant.load_model` takes; None: the demo model) on host:port."""
    import uvicorn

    from llmquant.loading import load_model
    from llmquant.serve.app import create_app
    from llmquant.serve.engine import Engine

    if not 1 <= port <= 65535:
        raise InvalidConfigError(f"--port must be between 1 and 65535, got {port}.")
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    loaded = load_model(model, revision=revision, dtype=dtype, device=device, allow_pickle=allow_pickle,
                        trust_remote_code=trust_remote_code)
    name = served_model_name or default_model_name(model, loaded)
    engine = Engine(loaded, max_batch_size=max_batch_size, max_waiting=max_waiting, max_model_len=max_model_len,
                    lean_forward=lean_forward)
    app = create_app(engine, name, api_key=api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=shutdown_timeout)
    server = _graceful_server(config, app, engine)
    if ready_message:
        where = "all interfaces" if host in ("0.0.0.0", "::") else host
        print(f"serving {name} ({loaded.source.describe()}) on http://{host}:{port}/v1 ({where}); "
              f"max context {engine.max_model_len} tokens, batch {max_batch_size}"
              f"{', API key required' if api_key else ''}", file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        engine.shutdown(drain=False, timeout=5)


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
