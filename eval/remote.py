"""Perplexity (and top-1 agreement with a local base model) of a model as a server serves it.

    from llmquant.eval.remote import remote_perplexity
    r = remote_perplexity("http://127.0.0.1:8000/v1", model="out", tokenizer="out/", max_tokens=8192)

Method: the evaluation text is tokenized here, with the model's tokenizer, and cut into the
same sliding windows as `eval.perplexity`. Each window goes to POST /v1/completions as a
token-id prompt with `echo: true, max_tokens: 0, logprobs: 1`, so the server returns the
log-probability of every prompt token given the tokens before it (the first is null). The
scored tokens of each window are summed exactly as locally: the same tokens, the same
context, so a served model's number equals the local one up to the server's arithmetic.

Top-1 agreement with `base` (a local model with the same tokenizer): the server's most likely
token at each scored position is the largest entry of `top_logprobs`, compared by its text
with the base model's argmax token decoded alone. KL divergence needs the whole distribution,
and servers return at most 5 (completions) or 20 (chat) alternatives, so it is not computed
over HTTP: a truncated KL would understate the divergence by an unknown amount.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

from llmquant.data.eval_data import EvalData
from llmquant.data.evaluation import describe_scored, scored_text
from llmquant.data.tokenize import tokenize_split
from llmquant.eval.endpoint import Endpoint, EndpointError, check_response, http_client, load_tokenizer, \
    resolve_model_name, transport_errors
from llmquant.eval.local_model import DEFAULT_MAX_WINDOW
from llmquant.eval.windows import Window, plan_windows


@dataclass
class RemotePerplexityResult:
    perplexity: float
    nll_per_token: float
    num_tokens_scored: int
    bits_per_byte: float
    per_window: list[float]  # mean NLL (nats/token) of each window
    top1_agreement: float | None  # with the local base model, when one was given
    method: dict[str, Any]
    seconds: float
    model: str
    num_bytes: int = 0
    base: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def remote_perplexity(base_url: str, model: str | None = None, data: EvalData | None = None, *,
                      api_key: str | None = None, tokenizer: Any = None, base: Any = None, timeout: float = 600.0,
                      progress: bool = True, **options: Any) -> RemotePerplexityResult:
    """Sliding-window perplexity of the model served at `base_url` (see the module docstring).

    model: the served model name (default: the first /v1/models lists).
    tokenizer: the model's tokenizer, as a source (folder, Hub id, None: the demo model) or an
        object. base: a local model (source or `LoadedModel`) for top-1 agreement; optional.
    data: an `llmquant.data.EvalData` (or its fields as keyword `options`), as in
        `eval.perplexity`; window default 1024 tokens; batch_size: windows per request; its
        loading options apply to `base`.
    """
    data = EvalData.build(data, **options)
    endpoint = Endpoint(base_url, model, api_key)
    text_split = scored_text(data)
    window = data.window or DEFAULT_MAX_WINDOW
    stride = data.stride or window
    batch_size = data.batch_size

    nll_sum, scored, agree = 0.0, 0, 0
    per_window: list[float] = []
    with http_client(timeout) as client:
        # Ask the server first: a wrong URL fails in a second, before a tokenizer or base model loads.
        name = resolve_model_name(client, endpoint)
        tok = load_tokenizer(tokenizer, trust_remote_code=data.load.trust_remote_code)
        stream = tokenize_split(tok, text_split, max_tokens=data.max_tokens)
        windows = plan_windows(stream.num_tokens, window, stride)
        base_lm, base_name = _base_model(base, data)
        decode = _token_text(tok)
        start = time.perf_counter()
        bar = tqdm(total=len(windows), desc="remote perplexity", unit="window", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        with bar:
            for i in range(0, len(windows), batch_size):
                batch = windows[i:i + batch_size]
                prompts = [stream.ids[w.begin:w.end].tolist() for w in batch]
                for w, prompt, logprobs in zip(batch, prompts, _prompt_logprobs(client, endpoint, name, prompts)):
                    lps, tops = _scored_entries(w, prompt, logprobs)
                    nll = -sum(lps)
                    nll_sum += nll
                    scored += len(lps)
                    per_window.append(nll / len(lps))
                    if base_lm is not None:
                        agree += _count_top1(base_lm, prompt, w, tops, decode)
                bar.update(len(batch))
                bar.set_postfix(ppl=f"{_exp(nll_sum / scored):.3f}")
    seconds = time.perf_counter() - start
    return RemotePerplexityResult(
        perplexity=_exp(nll_sum / scored), nll_per_token=nll_sum / scored, num_tokens_scored=scored,
        bits_per_byte=nll_sum / math.log(2) / stream.num_bytes, per_window=per_window,
        top1_agreement=agree / scored if base_lm is not None else None,
        method={
            "endpoint": endpoint.url, "served_model": name, "dataset": stream.dataset, "split": stream.split,
            "data": stream.description, "scored": describe_scored(stream), "num_tokens": stream.num_tokens,
            "max_tokens": data.max_tokens,
            "window": window, "stride": stride, "num_windows": len(windows), "batch_size": batch_size,
            "normalization": "token", "bos": False,
            "how": "POST /v1/completions, token-id prompts, echo=true, max_tokens=0, logprobs=1",
            "kl": "not computed over HTTP (servers return at most 5-20 alternatives per token)",
            "top1": "server's largest top_logprobs entry vs base argmax, compared as token text" if base_lm else None,
        },
        seconds=seconds, model=endpoint.describe(), num_bytes=stream.num_bytes, base=base_name,
    )


def _prompt_logprobs(client, endpoint: Endpoint, name: str, prompts: list[list[int]]) -> list[dict]:
    body = {"model": name, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1, "temperature": 0}
    try:
        response = client.post(endpoint.url + "/completions", json=body, headers=endpoint.headers())
    except transport_errors() as e:
        raise EndpointError.unreachable(endpoint, e) from None
    check_response(response, endpoint)
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    if len(choices) != len(prompts) or any(c.get("logprobs") is None for c in choices):
        raise EndpointError(f"{endpoint.url} did not return prompt logprobs for every prompt; it needs to support "
                            "echo with logprobs on /v1/completions.")
    return [c["logprobs"] for c in choices]


def _scored_entries(w: Window, prompt: list[int], logprobs: dict) -> tuple[list[float], list[dict | None]]:
    """The logprobs of the window's scored tokens and their top_logprobs entries."""
    token_lps = logprobs["token_logprobs"]
    if len(token_lps) < len(prompt):
        raise EndpointError(f"The server returned {len(token_lps)} prompt logprobs for a {len(prompt)}-token "
                            "prompt; it may not echo token-id prompts verbatim.")
    first = w.first_scored - w.begin
    lps = token_lps[first:len(prompt)]
    if any(lp is None for lp in lps):
        raise EndpointError("The server returned no logprob for a prompt token after the first.")
    tops = (logprobs.get("top_logprobs") or [None] * len(token_lps))[first:len(prompt)]
    return [float(lp) for lp in lps], tops


def _count_top1(base_lm, prompt: list[int], w: Window, tops: list[dict | None], decode) -> int:
    from llmquant.eval.agreement import scored_logprobs

    n = w.num_scored
    with torch.inference_mode():
        best = scored_logprobs(base_lm, torch.tensor([prompt]), n)[0].argmax(-1).tolist()  # (n,)
    agree = 0
    for token_id, top in zip(best, tops):
        if top:
            agree += max(top, key=top.get) == decode(token_id)
    return agree


def _base_model(base: Any, data: EvalData):
    if base is None:
        return None, None
    from llmquant.loading import LoadedModel, load_model

    loaded = base if isinstance(base, LoadedModel) else load_model(base, **data.load_options())
    return loaded.model, loaded.source.describe()


def _token_text(tokenizer):
    from llmquant.serve.choices import TokenText  # the same per-token decoding our server reports

    return TokenText(tokenizer)


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")
