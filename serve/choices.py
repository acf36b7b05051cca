"""What /v1/completions and /v1/chat/completions share: submitting prompts x n choices, token
text for logprobs, usage, server-sent events."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import uuid

from llmquant.serve.api_errors import APIError
from llmquant.serve.events import FINISH_ABORT
from llmquant.serve.fanout import Fanout
from llmquant.serve.sampling import InvalidRequestError, SamplingParams

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice_params(params: SamplingParams, j: int) -> SamplingParams:
    """The j-th of n choices: with a seed, each choice draws from its own seed (seed + j), so
    the n answers differ and the whole response is still reproducible."""
    if params.seed is None or j == 0:
        return params
    return dataclasses.replace(params, seed=params.seed + j)


def submit_all(fan: Fanout, prompts: list[list[int]], n: int, params: SamplingParams) -> None:
    """Check every prompt against the context first, so that a 400 queues nothing."""
    for ids in prompts:
        fan.engine.check_length(len(ids), params.max_tokens)
    try:
        for i, ids in enumerate(prompts):
            for j in range(n):
                fan.submit(i * n + j, ids, choice_params(params, j))
    except BaseException:
        fan.cancel()
        raise
    if fan.metrics:
        fan.metrics.prompt_tokens.inc(sum(len(ids) for ids in prompts) * n)


def check_token_ids(ids: list[int], vocab_size: int, param: str = "prompt") -> list[int]:
    bad = next((t for t in ids if t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(f"Token id {bad} is out of range for this model's vocabulary of {vocab_size}.",
                                  param)
    return ids


def raise_if_aborted(finish_reason: str | None) -> None:
    if finish_reason == FINISH_ABORT:
        raise APIError(503, "Generation was interrupted (the server is shutting down or hit an internal error).",
                       "service_unavailable")


class TokenText:
    """Each token's own text, as logprobs report it (decoded alone; cached: the same ids recur)."""

    def __init__(self, tokenizer):
        self._decode = functools.lru_cache(maxsize=65536)(
            lambda t: tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False))

    def __call__(self, token_id: int) -> str:
        return self._decode(token_id)
