"""Every error leaves the server in the OpenAI shape: {"error": {"message", "type", "param", "code"}}.

The official clients map the status code to an exception class (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, 503 InternalServerError) and show
the message; lm-evaluation-harness and vLLM's benchmark read the same fields.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmquant.serve.events import EngineBusyError, EngineStoppedError
from llmquant.serve.sampling import InvalidRequestError

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    return f"Invalid value for '{where}': {first.get('msg', 'invalid')}.", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(InvalidRequestError)
    async def _invalid_params(request: Request, exc: InvalidRequestError):
        return error_response(400, str(exc), "invalid_request_error", exc.param)

    @app.exception_handler(EngineBusyError)
    async def _busy(request: Request, exc: EngineBusyError):
        return error_response(429, str(exc), "rate_limit_error", None, "server_busy")

    @app.exception_handler(EngineStoppedError)
    async def _stopping(request: Request, exc: EngineStoppedError):
        return error_response(503, str(exc), "service_unavailable", None, "shutting_down")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "Internal server error; the server log has the details.", "server_error")
