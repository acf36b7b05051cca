"""Sampling parameters and the per-step choice of the next token.

The parameters mirror the OpenAI API (and vLLM's meaning of them): `temperature` 0 is greedy;
`top_p`, `top_k` restrict the candidates; `presence_penalty` / `frequency_penalty` subtract from
the logits of tokens already generated (not prompt tokens, as vLLM and OpenAI do); `seed` makes
a sampled answer reproducible regardless of what else runs in the batch, because each seeded
sequence draws from its own generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from llmquant.errors import LLMQuantError

MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit
MAX_STOP_STRINGS = 4
EPS_TEMPERATURE = 1e-5  # below this a temperature means greedy


class InvalidRequestError(LLMQuantError):
    """A generation request with an invalid parameter; `param` names it (the HTTP 400 `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the model's context length; 0: score the prompt only
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False  # the chosen token's log probability
    top_logprobs: int = 0  # and this many most likely alternatives
    prompt_logprobs: bool = False  # log probabilities of the prompt tokens too (completions `echo`)
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 0),
               "max_tokens must be a non-negative integer", "max_tokens")
        # 0 new tokens only makes sense to score the prompt (completions with echo and logprobs).
        _check(self.max_tokens != 0 or self.prompt_logprobs,
               "max_tokens must be at least 1 unless the prompt is echoed with logprobs", "max_tokens")
        _check(_finite(self.temperature) and 0.0 <= self.temperature <= 2.0,
               "temperature must be between 0 and 2", "temperature")
        _check(_finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]", "top_p")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be a non-negative integer", "top_k")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2.0 <= value <= 2.0, f"{name} must be between -2 and 2", name)
        _check(len(self.stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) and s for s in self.stop),
               f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty strings", "stop")
        _check(isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
               f"top_logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
        _check(self.seed is None or (isinstance(self.seed, int) and -2**63 <= self.seed < 2**64),
               "seed must be an integer", "seed")

    @property
    def greedy(self) -> bool:
        return self.temperature < EPS_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise InvalidRequestError(message, param)


def make_generator(seed: int | None) -> torch.Generator | None:
    """A private CPU generator for a seeded request; None draws from torch's global one."""
    if seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(seed % 2**64)


def apply_penalties(logits: Tensor, counts: dict[int, int], params: SamplingParams) -> Tensor:
    """OpenAI's definition: logit -= count * frequency_penalty + (count > 0) * presence_penalty."""
    if not params.penalized or not counts:
        return logits
    ids = torch.tensor(list(counts), dtype=torch.long)
    n = torch.tensor(list(counts.values()), dtype=logits.dtype)
    logits = logits.clone()
    logits[ids] -= n * params.frequency_penalty + params.presence_penalty
    return logits


def choose_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one row of float32 logits (V,), after penalties."""
    if params.greedy:
        if logits.device.type == "cpu" and logits.dtype == torch.float32:  # numpy: 5 us for 49k logits, torch 70
            return int(logits.numpy().argmax())
        return int(torch.argmax(logits))
    scaled = logits / params.temperature
    if params.top_k and params.top_k < scaled.numel():
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        cut = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        cut[0] = False  # a top_p below float32's smallest value must not remove every token
        sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logprobs_row: Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log probability of `token` and the `top` most likely (id, logprob) pairs."""
    chosen = float(logprobs_row[token])
    if not top:
        return chosen, []
    values, ids = torch.topk(logprobs_row, top)
    return chosen, [(int(i), float(v)) for i, v in zip(ids, values)]
