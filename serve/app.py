"""`create_app`: the OpenAI-compatible HTTP API over one engine.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health,
GET /metrics. With an API key, every /v1 route wants `Authorization: Bearer KEY` (compared in
constant time); /health and /metrics stay open for probes and scrapers, as in vLLM.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from llmquant.serve.api_errors import APIError, install_error_handlers
from llmquant.serve.chat import create_chat_completion
from llmquant.serve.choices import now
from llmquant.serve.completions import create_completion
from llmquant.serve.metrics import Metrics
from llmquant.serve.protocol import ChatCompletionRequest, CompletionRequest


@dataclass
class AppState:
    engine: object
    model_name: str
    vocab_size: int
    metrics: Metrics
    api_key: str | None
    created: int
    accepting: bool = True


class _CountRequests:
    """Counts /v1 responses by route and status. Plain ASGI rather than `@app.middleware`:
    starlette's BaseHTTPMiddleware re-streams every chunk of a streaming response."""

    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models")

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        # A bounded label set: any other path (a 404) counts as "other".
        route = path if path in self.ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(engine, model_name: str, *, api_key: str | None = None) -> FastAPI:
    """The ASGI app; run it with uvicorn (`serve.server.run_server` does)."""
    state = AppState(engine=engine, model_name=model_name, vocab_size=engine.model.config.vocab_size,
                     metrics=Metrics(engine), api_key=api_key or None, created=now())
    app = FastAPI(title="llmquant", description="OpenAI-compatible API served by llmquant", version="1")
    app.state.llm = state
    install_error_handlers(app)

    app.add_middleware(_CountRequests, metrics=state.metrics)

    def authorized(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), state.api_key.encode()):
            raise APIError(401, "Missing or incorrect API key. Send it as 'Authorization: Bearer KEY'.",
                           "invalid_request_error", None, "invalid_api_key")

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise APIError(404, f"The model '{name}' does not exist. This server serves '{state.model_name}'.",
                           "not_found_error", "model", "model_not_found")

    def check_accepting() -> None:
        if not state.accepting:
            raise APIError(503, "The server is shutting down and accepts no new requests.", "service_unavailable",
                           None, "shutting_down")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def list_models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "llmquant", "max_model_len": engine.max_model_len}]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    async def get_model(model_id: str):
        check_model(model_id)
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "llmquant"}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        check_accepting()
        return await create_completion(body, state, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        check_accepting()
        return await create_chat_completion(body, state, request)

    @app.get("/health")
    async def health():
        if not state.accepting:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    return app
