"""What the engine reports per generated token, and the errors it raises when asked for too much."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmquant.errors import LLMQuantError
from llmquant.serve.sampling import InvalidRequestError

FINISH_STOP = "stop"  # end-of-sequence token, a stop token id or a stop string
FINISH_LENGTH = "length"  # max_tokens or the context length reached
FINISH_ABORT = "abort"  # cancelled by the caller, or the engine shut down first


@dataclass
class TokenEvent:
    """One step of one request. `token_id` is None on an abort event and on the single event of a
    scoring-only request (max_tokens 0)."""

    request_id: str
    token_id: int | None
    text: str  # text this token completed (may be empty: a partial character, a possible stop string)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    # On the first event of a request that asked for them: one entry per prompt token, None for
    # the first (nothing precedes it), else (logprob, top alternatives).
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    num_prompt_tokens: int = 0
    num_generated: int = 0  # including this token


class EngineBusyError(LLMQuantError):
    """The waiting queue is full; the client should retry later (HTTP 429)."""


class EngineStoppedError(LLMQuantError):
    """The engine is shutting down and accepts no new requests (HTTP 503)."""


class ContextLengthError(InvalidRequestError):
    """The prompt, or prompt plus max_tokens, exceeds the model's context length (HTTP 400)."""
