"""Talking to an OpenAI-compatible server: the address, the key, the model name, a tokenizer.

Shared by the remote perplexity (`eval.remote`) and the load generator (`eval.loadgen`).
The key is sent as `Authorization: Bearer KEY` and never written into results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from llmquant.errors import InvalidConfigError, LLMQuantError


class EndpointError(LLMQuantError):
    """The server could not be reached, or answered with an error."""

    @classmethod
    def unreachable(cls, endpoint: "Endpoint", error: BaseException) -> "EndpointError":
        """No answer at all (refused, unknown host, timed out): say where, and how to start a server."""
        from urllib.parse import urlsplit

        parts = urlsplit(endpoint.url)
        port = f" --port {parts.port}" if parts.port else ""
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return cls(f"Could not reach {endpoint.url} ({detail}). Is a server running there? Start one with "
                   f"`llmquant serve MODEL{port}` (or any OpenAI-compatible server), or check the URL.")


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # None: the first model /v1/models lists
    api_key: str | None = None

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise InvalidConfigError(f"base URL must start with http:// or https://, got {self.base_url!r}.")

    @property
    def url(self) -> str:
        """The base URL ending in /v1 (added when the user gave the server's root)."""
        url = self.base_url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"

    def headers(self) -> dict[str, str]:
        key = self.api_key or os.environ.get("OPENAI_API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def describe(self) -> str:
        return f"{self.model or '(first model)'} at {self.url}"


def resolve_model_name(client: Any, endpoint: Endpoint) -> str:
    """The model to name in requests: the one given, else the first one the server lists."""
    # Asked even when the name is given: an address with no server behind it fails here, at once.
    try:
        response = client.get(endpoint.url + "/models", headers=endpoint.headers())
    except transport_errors() as e:
        raise EndpointError.unreachable(endpoint, e) from None
    if endpoint.model:
        return endpoint.model  # the server answered; a wrong name is reported by the first request
    check_response(response, endpoint)
    data = response.json().get("data") or []
    if not data:
        raise EndpointError(f"{endpoint.url}/models lists no model; pass the model name.")
    return data[0]["id"]


def check_response(response: Any, endpoint: Endpoint) -> None:
    if response.status_code >= 400:
        try:
            message = response.json().get("error", {}).get("message") or response.text
        except ValueError:
            message = response.text
        raise EndpointError(f"{endpoint.url} answered HTTP {response.status_code}: {str(message)[:300]}")


def load_tokenizer(source: Any = None, *, trust_remote_code: bool = False):
    """The tokenizer of a model source (folder, Hub id, .gguf, None: the demo model), a
    `LoadedModel`, or a tokenizer object passed through, without loading the weights."""
    from llmquant.loading import LoadedModel, load_model, resolve_source

    if isinstance(source, LoadedModel):
        return source.tokenizer
    if source is not None and not isinstance(source, (str, os.PathLike)):
        return source  # already a tokenizer
    resolved = resolve_source(source)
    if resolved.kind == "gguf":
        return load_model(resolved, dtype="float32", device="cpu").tokenizer
    from llmquant.loading.load import load_tokenizer as load_folder_tokenizer

    return load_folder_tokenizer(resolved.path, trust_remote_code)


def http_client(timeout: float):
    """A synchronous HTTP client (httpx2, which the openai client is built on)."""
    import httpx2

    return httpx2.Client(timeout=timeout)


def transport_errors() -> tuple[type[BaseException], ...]:
    import httpx2

    return (httpx2.HTTPError, OSError)
