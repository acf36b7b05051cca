"""Online load against any OpenAI-compatible server: latency and throughput as vLLM measures them.

    from llmquant.eval.loadgen import load_test
    r = load_test("http://127.0.0.1:8000/v1", model="out", tokenizer="out/", concurrency=8,
                  num_prompts=64, input_len=128, output_len=64)

Requests are streaming POST /v1/completions with token-id prompts of exactly `input_len`
tokens (held-out corpus text, or random token ids with `prompts="synthetic"`), `max_tokens:
output_len` and `ignore_eos: true` (a vLLM extension; servers that do not know it may stop
early, which the output token counts then show). They are sent either at a fixed concurrency
(a new request starts when one finishes) or as a Poisson process at `request_rate` requests/s
(exponential gaps, seeded), optionally capped by `concurrency`. One untimed warm-up request
goes first; if it fails, the run stops with its error.

Metrics, with the definitions of vLLM's `benchmarks/benchmark_serving.py`:
* TTFT (time to first token): from sending the request to the first streamed chunk that carries
  a choice (usage-only chunks do not count);
* ITL (inter-token latency): the gaps between consecutive streamed chunks after the first,
  pooled over all requests;
* TPOT (time per output token): per request, (E2E - TTFT) / (output tokens - 1), for requests
  with more than one output token;
* E2E latency: from sending the request to the end of its stream;
* request throughput: successful requests / benchmark duration; output throughput: output tokens
  of successful requests / duration (output tokens from the final `usage` chunk, else chunks).
Mean, p50, p90 and p99 (linear interpolation, as numpy.percentile) in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from llmquant.eval.endpoint import Endpoint, EndpointError, check_response, http_client, load_tokenizer, resolve_model_name
from llmquant.errors import InvalidConfigError

PERCENTILES = (50, 90, 99)
MAX_ERRORS_KEPT = 5


@dataclass
class RequestRecord:
    success: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class LoadResult:
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # successful requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (prompt + output tokens) / s
    total_input_tokens: int
    total_output_tokens: int
    ttft_ms: dict[str, float]  # {"mean", "p50", "p90", "p99"}
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    errors: list[str]  # the first few distinct failure messages
    method: dict[str, Any]
    model: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_test(
    base_url: str,
    model: str | None = None,
    *,
    api_key: str | None = None,
    tokenizer: Any = None,
    concurrency: int | None = 8,
    request_rate: float | None = None,
    num_prompts: int = 32,
    input_len: int = 128,
    output_len: int = 64,
    prompts: str = "dataset",
    seed: int = 0,
    timeout: float = 600.0,
    progress: bool = True,
) -> LoadResult:
    """Send `num_prompts` streaming requests and measure them (see the module docstring).

    concurrency: requests in flight at most (None: no limit, only with request_rate).
    request_rate: Poisson arrivals per second; None: send as fast as `concurrency` allows.
    prompts: "dataset" (held-out builtin corpus) or "synthetic" (random token ids).
    tokenizer: the served model's tokenizer as a source (None: the demo model) or an object.
    """
    if concurrency is None and request_rate is None:
        raise InvalidConfigError("Give a concurrency, a request_rate, or both.")
    if (concurrency is not None and concurrency < 1) or (request_rate is not None and request_rate <= 0):
        raise InvalidConfigError("concurrency must be >= 1 and request_rate > 0.")
    if num_prompts < 1 or input_len < 1 or output_len < 1:
        raise InvalidConfigError("num_prompts, input_len and output_len must be at least 1.")
    endpoint = Endpoint(base_url, model, api_key)
    with http_client(timeout) as client:  # first: a wrong URL fails before the tokenizer loads
        name = resolve_model_name(client, endpoint)
    tok = load_tokenizer(tokenizer)
    token_prompts = make_prompts(tok, prompts, num_prompts, input_len, seed)
    records, duration = asyncio.run(_run_all(endpoint, name, token_prompts, output_len, concurrency, request_rate,
                                             seed, timeout, progress))
    return summarize(records, duration, model=f"{name} at {endpoint.url}", method={
        "endpoint": endpoint.url, "served_model": name, "concurrency": concurrency, "request_rate": request_rate,
        "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len, "prompts": prompts,
        "seed": seed, "api": "POST /v1/completions, stream=true, token-id prompts, ignore_eos=true, temperature 0",
        "definitions": "vLLM benchmark_serving: TTFT, TPOT, ITL, E2E latency",
    })


def make_prompts(tokenizer, kind: str, num_prompts: int, input_len: int, seed: int) -> list[list[int]]:
    """`num_prompts` token-id prompts of exactly `input_len` tokens each."""
    if kind == "synthetic":
        rng = random.Random(seed)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        vocab = [i for i in range(len(tokenizer)) if i not in special]
        return [[rng.choice(vocab) for _ in range(input_len)] for _ in range(num_prompts)]
    if kind != "dataset":
        raise InvalidConfigError(f"prompts must be 'dataset' or 'synthetic', not {kind!r}.")
    from llmquant.data.splits import load_text_split
    from llmquant.data.tokenize import tokenize_split

    ids = tokenize_split(tokenizer, load_text_split(None, "evaluation")).ids.tolist()
    if len(ids) < input_len:
        raise InvalidConfigError(f"input_len {input_len} is longer than the evaluation text ({len(ids)} tokens).")
    starts = range(0, len(ids) - input_len + 1, input_len)
    return [ids[s:s + input_len] for s in (starts[i % len(starts)] for i in range(num_prompts))]


async def _run_all(endpoint: Endpoint, name: str, prompts: list[list[int]], output_len: int,
                   concurrency: int | None, request_rate: float | None, seed: int, timeout: float,
                   progress: bool) -> tuple[list[RequestRecord], float]:
    import httpx2

    limits = httpx2.Limits(max_connections=concurrency or len(prompts), max_keepalive_connections=concurrency or 0)
    gate = asyncio.Semaphore(concurrency or len(prompts))
    rng = random.Random(seed)
    bar = tqdm(total=len(prompts), desc="load", unit="req", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    async def one(client, prompt):
        async with gate:
            record = await _stream_one(client, endpoint, name, prompt, output_len)
        bar.update()
        return record

    async with httpx2.AsyncClient(timeout=timeout, limits=limits) as client:
        # One untimed request first, as vLLM's benchmark does: it checks the server answers and
        # keeps one-off costs (first-call kernel setup, connection) out of the numbers.
        warm = await _stream_one(client, endpoint, name, prompts[0], min(output_len, 2))
        if not warm.success:
            bar.close()
            raise EndpointError(f"The first (warm-up) request to {endpoint.url} failed: {warm.error}")
        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(one(client, prompt)))
            if request_rate is not None:
                await asyncio.sleep(rng.expovariate(request_rate))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return list(records), duration


async def _stream_one(client, endpoint: Endpoint, name: str, prompt: list[int], output_len: int) -> RequestRecord:
    body = {"model": name, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    record = RequestRecord(prompt_tokens=len(prompt))
    chunks = 0
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", endpoint.url + "/completions", json=body,
                                 headers=endpoint.headers()) as response:
            if response.status_code >= 400:
                await response.aread()
                check_response(response, endpoint)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                message = json.loads(data)
                if message.get("usage"):
                    record.output_tokens = message["usage"].get("completion_tokens") or 0
                    record.prompt_tokens = message["usage"].get("prompt_tokens") or record.prompt_tokens
                if not message.get("choices"):  # vLLM's rule: any chunk with a choice is a token event
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    record.ttft = now - start
                else:
                    record.itl.append(now - last)
                last = now
                chunks += 1
        record.e2e = time.perf_counter() - start
        record.output_tokens = record.output_tokens or chunks
        record.success = chunks > 0
        if not record.success:
            record.error = "the stream ended without any choice chunk"
    except Exception as e:  # noqa: BLE001 - any failure of one request is recorded, not raised
        record.error = f"{type(e).__name__}: {e}"[:300]
    return record


def summarize(records: list[RequestRecord], duration: float, *, model: str, method: dict) -> LoadResult:
    ok = [r for r in records if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = list(dict.fromkeys(r.error for r in records if not r.success))[:MAX_ERRORS_KEPT]
    return LoadResult(
        completed=len(ok), failed=len(records) - len(ok), duration_s=duration,
        request_throughput=len(ok) / duration, output_throughput=out_tokens / duration,
        total_token_throughput=(in_tokens + out_tokens) / duration, total_input_tokens=in_tokens,
        total_output_tokens=out_tokens, ttft_ms=stats_ms([r.ttft for r in ok]), tpot_ms=stats_ms(tpots),
        itl_ms=stats_ms([x for r in ok for x in r.itl]), e2e_ms=stats_ms([r.e2e for r in ok]),
        errors=errors, method=method, model=model,
    )


def stats_ms(seconds: list[float]) -> dict[str, float]:
    """Mean and percentiles in milliseconds (NaN when there is nothing to measure)."""
    if not seconds:
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in PERCENTILES}}
    ms = sorted(1000.0 * s for s in seconds)
    return {"mean": sum(ms) / len(ms), **{f"p{p}": percentile(ms, p) for p in PERCENTILES}}


def percentile(sorted_values: list[float], q: float) -> float:
    """numpy.percentile's default (linear interpolation between closest ranks)."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
