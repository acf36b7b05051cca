"""Offline throughput of a model through our generation engine (`serve.Engine`), no HTTP.

    from llmquant.eval.throughput import offline_throughput
    r = offline_throughput("out/", prefill_lengths=(128, 512, 2048), batch_sizes=(1, 8, 32))

Definitions (all prompts are held-out corpus text, greedy decoding, EOS ignored):
* prefill tokens/s at prompt length L: L / (time from submitting one L-token request with
  max_tokens=1 until its only token arrives); a length that does not fit the context is capped
  to the context minus one (and noted in `skipped`);
* decode tokens/s at batch B: B requests of `prompt_tokens` tokens submitted together; once
  every one of them has its first token (all prefilled, all in the batch), the tokens emitted
  until the last one finishes, divided by that time;
* load time: `llmquant.load_model` wall time; checkpoint size: the weight files on disk;
* peak memory: the process's resident set size, sampled every 10 ms during load and
  measurement (CPU), or `torch.cuda.max_memory_allocated` (CUDA).
Each measurement is preceded by an untimed warm-up request.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llmquant.errors import InvalidConfigError

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


@dataclass
class ThroughputResult:
    prefill: list[dict[str, float]]  # {prompt_tokens, seconds, tokens_per_s}
    decode: list[dict[str, float]]  # {batch_size, tokens, seconds, tokens_per_s}
    load_seconds: float | None
    checkpoint_bytes: int | None
    peak_rss_bytes: int | None
    cuda_peak_allocated_bytes: int | None
    method: dict[str, Any]
    model: str
    skipped: list[str] = field(default_factory=list)  # lengths that were capped, and why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def offline_throughput(
    model: Any = None,
    *,
    prefill_lengths: tuple[int, ...] | list[int] = (128, 512, 2048),
    batch_sizes: tuple[int, ...] | list[int] = (1, 8, 32),
    decode_tokens: int = 32,
    prompt_tokens: int = 64,
    revision: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
) -> ThroughputResult:
    """Prefill and decode speed, load time, memory and size of `model` (a source or a `LoadedModel`;
    the loading options, `revision` included, apply to a source)."""
    from llmquant.loading import LoadedModel, load_model
    from llmquant.serve.engine import Engine
    from llmquant.serve.setup_thread import run_in_setup_thread

    if decode_tokens < 2 or prompt_tokens < 1 or any(n < 1 for n in (*prefill_lengths, *batch_sizes)):
        raise InvalidConfigError("throughput needs decode_tokens >= 2, prompt_tokens >= 1, and positive prompt "
                                 "lengths and batch sizes.")
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with _RssSampler() as rss:
        def build():
            load_seconds = None
            if isinstance(model, LoadedModel):
                loaded = model
            else:
                t = time.perf_counter()
                loaded = load_model(model, revision=revision, dtype=dtype, device=device,
                                    allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
                load_seconds = time.perf_counter() - t
            # No prefix cache: the prefill runs reuse the corpus's first tokens at growing lengths,
            # and each would find the last one's blocks, measuring a cache hit, not a prefill.
            engine = Engine(loaded, max_batch_size=max(batch_sizes), max_waiting=max(batch_sizes) + 1,
                            max_prefill_tokens=max(4096, max(batch_sizes) * prompt_tokens), prefix_cache_tokens=0)
            return loaded, load_seconds, engine

        # As `llmquant serve` does (serve/setup_thread.py): the engine's thread is then the only
        # one with OpenMP workers, so what is measured is what the server runs.
        loaded, load_seconds, engine = run_in_setup_thread(build)
        try:
            corpus = _corpus_ids(loaded.tokenizer, max(max(prefill_lengths), prompt_tokens * max(batch_sizes)))
            prefill, decode, skipped = _measure(engine, corpus, prefill_lengths, batch_sizes, decode_tokens,
                                                prompt_tokens, progress)
        finally:
            engine.shutdown(drain=False, timeout=10)
    lm = loaded.model
    return ThroughputResult(
        prefill=prefill, decode=decode, load_seconds=load_seconds,
        checkpoint_bytes=checkpoint_bytes(loaded.source.path),
        peak_rss_bytes=rss.peak, cuda_peak_allocated_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        method={"engine": "llmquant.serve.Engine (continuous batching, KV cache)", "decode_tokens": decode_tokens,
                "prompt_tokens": prompt_tokens, "max_model_len": engine.max_model_len, "sampling": "greedy, ignore_eos",
                "prompts": "held-out builtin corpus text",
                "dtype": str(getattr(lm, "dtype", "")).removeprefix("torch."),
                "device": str(next(lm.parameters()).device), "torch_threads": torch.get_num_threads()},
        model=loaded.source.describe(), skipped=skipped,
    )


def _measure(engine, corpus: list[int], prefill_lengths, batch_sizes, decode_tokens: int, prompt_tokens: int,
             progress: bool):
    from llmquant.serve.sampling import SamplingParams

    skipped: list[str] = []
    lengths: list[int] = []
    for n in prefill_lengths:
        capped = min(n, engine.max_model_len - 1)  # one position is left for the token it produces
        if capped != n:
            skipped.append(f"prefill {n}: capped to {capped} by the context ({engine.max_model_len} tokens)")
        if capped not in lengths:
            lengths.append(capped)
    if prompt_tokens + decode_tokens > engine.max_model_len:
        raise InvalidConfigError(f"prompt_tokens + decode_tokens ({prompt_tokens + decode_tokens}) exceed the "
                                 f"model's context ({engine.max_model_len}).")
    steps = len(lengths) + len(batch_sizes)
    bar = tqdm(total=steps, desc="throughput", unit="run", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    prefill, decode = [], []
    with bar:
        _run(engine, [corpus[:8]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))  # warm-up
        for n in lengths:
            params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
            _run(engine, [corpus[-n:]], params)  # warm-up at this shape
            times = _run(engine, [corpus[:n]], params)
            seconds = times[0][-1] - times[0][0]
            prefill.append({"prompt_tokens": n, "seconds": seconds, "tokens_per_s": n / seconds})
            bar.update()
        for b in batch_sizes:
            prompts = [corpus[i * prompt_tokens:(i + 1) * prompt_tokens] for i in range(b)]
            params = SamplingParams(max_tokens=decode_tokens, temperature=0, ignore_eos=True)
            _run(engine, prompts[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
            times = _run(engine, prompts, params)
            all_in = max(t[1] for t in times)  # every sequence has its first token
            end = max(t[-1] for t in times)
            tokens = sum(sum(1 for x in t[1:] if x > all_in) for t in times)
            seconds = end - all_in
            decode.append({"batch_size": b, "tokens": tokens, "seconds": seconds,
                           "tokens_per_s": tokens / seconds if seconds > 0 else float("nan")})
            bar.update()
    return prefill, decode, skipped


def _run(engine, prompts: list[list[int]], params) -> list[list[float]]:
    """Submit the prompts together; per request: [submit time, time of each token event...]."""
    events: queue.Queue = queue.Queue()
    times: list[list[float]] = []
    for i, p in enumerate(prompts):
        times.append([time.perf_counter()])
        engine.submit(p, params, lambda e, i=i: events.put((i, e, time.perf_counter())))
    done = 0
    while done < len(prompts):
        i, event, t = events.get(timeout=600)
        if event.token_id is not None:
            times[i].append(t)
        if event.finish_reason is not None:
            if event.finish_reason == "abort":
                raise RuntimeError("the engine aborted a throughput request (see the log)")
            if event.token_id is None:
                times[i].append(t)
            done += 1
    return times


def _corpus_ids(tokenizer, num_tokens: int) -> list[int]:
    """At least `num_tokens` ids of held-out text (repeated when the split is shorter)."""
    from llmquant.data.splits import load_text_split
    from llmquant.data.tokenize import tokenize_split

    ids = tokenize_split(tokenizer, load_text_split(None, "evaluation"), max_tokens=num_tokens).ids.tolist()
    while len(ids) < num_tokens:
        ids = ids + ids
    return ids[:num_tokens]


def checkpoint_bytes(path: str | os.PathLike | None) -> int | None:
    """Size of the weight files of a checkpoint folder (or of one .gguf file)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


class _RssSampler:
    """Peak resident set size of this process while the block runs (a 10 ms sampling thread)."""

    INTERVAL_S = 0.01

    def __init__(self):
        self.peak: int | None = None
        self._stop = threading.Event()

    def __enter__(self):
        try:
            import psutil
        except ImportError:  # psutil is a dependency; a missing one only loses this number
            return self
        proc = psutil.Process()
        self.peak = proc.memory_info().rss

        def sample():
            while not self._stop.wait(self.INTERVAL_S):
                self.peak = max(self.peak, proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if hasattr(self, "_thread"):
            self._thread.join()
        return False
