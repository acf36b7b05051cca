"""Chunked prefill: a prompt computed in chunks gives what one pass gives (tiny Llama and other
architectures, sliding windows included); between a long prompt's chunks the running streams get
tokens, a short prompt that arrives meanwhile does not wait for the whole long one, and a
cancelled long prompt leaves the engine clean."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import torch

from llmquant.serve.engine import Engine
from llmquant.serve.prefill import PrefillJob, plan
from llmquant.serve.sampling import SamplingParams

ARCHITECTURES = {
    "qwen2": ("qwen2", None),
    "gemma2": ("gemma2", None),  # window 32, transformers' forward
    "mistral-window8": ("mistral", dict(sliding_window=8)),  # lean forward, every layer windowed
}
NAMES = ["llama", *ARCHITECTURES]
PROMPTS = [list(range(100, 170)), [300, 301, 302], list(range(50, 85)), list(range(10, 57))]  # 70, 3, 35, 47 tokens


def _edited(folder, tmp_path_factory, name: str, edits: dict):
    folder = shutil.copytree(folder, tmp_path_factory.mktemp("edited") / name)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edits}))
    return folder


@pytest.fixture(scope="module")
def models(architecture_dir, tiny_model_dir, tmp_path_factory):
    """name -> float32 LoadedModel; 'llama' is the tiny Llama, 'llama-2k' the same weights with a
    2048-token context (for the 1,500-token prompt)."""
    from llmquant import load_model

    loaded = {}

    def get(name: str):
        if name not in loaded:
            if name == "llama":
                folder = tiny_model_dir
            elif name == "llama-2k":
                folder = _edited(tiny_model_dir, tmp_path_factory, name, dict(max_position_embeddings=2048))
            else:
                base, edits = ARCHITECTURES[name]
                folder = architecture_dir(base)
                if edits:
                    folder = _edited(folder, tmp_path_factory, name, edits)
            loaded[name] = load_model(folder, dtype="float32")
        return loaded[name]

    return get


def run(engine: Engine, prompts: list[list[int]], max_tokens: int = 10, **params):
    """Submit `prompts` while the engine loop is held; each one's events."""
    out: list[list] = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def receiver(k: int):
        def receive(event):
            out[k].append(event)
            if event.finish_reason is not None:
                done.release()
        return receive

    with engine._cond:
        for k, ids in enumerate(prompts):
            engine.submit(ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=True,
                                              **params), receiver(k))
    for _ in prompts:
        assert done.acquire(timeout=120)
    return out


def assert_same(got, want):
    for events, expected in zip(got, want):
        assert [e.token_id for e in events] == [e.token_id for e in expected]
        assert [e.logprob for e in events] == pytest.approx([e.logprob for e in expected], abs=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_group_in_chunks_equals_one_pass(name, models):
    """A left-padded group computed 7 columns at a time, after a reused prefix or from scratch:
    the same last logits and the same keys and values as one pass from scratch."""
    engine = Engine(models(name), prefix_cache_tokens=0)
    engine.shutdown(timeout=10)  # only its forward is used, from this thread
    lengths = [len(p) for p in PROMPTS]

    def prefill(chunk: int, found=None):
        seqs = [type("Seq", (), {"prompt_ids": p})() for p in PROMPTS]
        past = None
        with torch.inference_mode():
            if found:  # the first `found` tokens' keys and values, from a one-pass prefill
                start, used = plan(lengths, found)
                full = whole.cache.layers
                past = [(layer.keys[:, :, :start].clone(), layer.values[:, :, :start].clone()) for layer in full]
                for row, n in enumerate(used):  # columns before a row's reused tokens are padding
                    for keys, values in past:
                        keys[row, :, :start - n] = 0
                        values[row, :, :start - n] = 0
            job = PrefillJob(seqs, engine.device, past)
            while (logits := job.run(engine.forward, job.columns(chunk * len(seqs)))) is None:
                pass
        return job, logits[:, -1]

    whole, want = prefill(max(lengths))
    for chunk, found in [(7, None), (1, None), (7, [64, 0, 32, 16])]:
        job, logits = prefill(chunk, found)
        assert (logits - want).abs().max() < 1e-4, (chunk, found)
        for ours, ref in zip(job.cache.layers, whole.cache.layers):
            real = job.mask.bool()[:, None, :, None]  # padding columns hold anything
            assert ((ours.keys - ref.keys) * real).abs().max() < 1e-4
            assert ((ours.values - ref.values) * real).abs().max() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_engine_chunked_equals_unchunked(name, models):
    """Prompts admitted together under a 16-token budget (each computed in chunks, several at
    once sharing a step) give the same tokens and logprobs as under the default budget, with and
    without a prefix cache."""
    loaded = models(name)
    outputs = []
    for budget, prefix in [(None, 0), (16, 0), (16, 4096)]:
        engine = Engine(loaded, max_prefill_tokens=budget, prefix_cache_tokens=prefix)
        try:
            outputs.append(run(engine, PROMPTS) + run(engine, [PROMPTS[0][:60] + [7, 8]]))
        finally:
            engine.shutdown(drain=False, timeout=10)
    assert_same(outputs[1], outputs[0])
    assert_same(outputs[2], outputs[0])


def test_prompt_logprobs_in_chunks(models):
    loaded = models("llama")
    got = []
    for budget in (None, 8):
        engine = Engine(loaded, max_prefill_tokens=budget)
        try:
            got.append(run(engine, [PROMPTS[0]], max_tokens=2, prompt_logprobs=True, top_logprobs=2)[0])
        finally:
            engine.shutdown(drain=False, timeout=10)
    assert_same([got[1]], [got[0]])
    want, ours = got[0][0].prompt_logprobs, got[1][0].prompt_logprobs
    assert len(ours) == len(PROMPTS[0]) and ours[0] is None
    assert [x[0] for x in ours[1:]] == pytest.approx([x[0] for x in want[1:]], abs=1e-4)
    assert [[t for t, _ in x[1]] for x in ours[1:]] == [[t for t, _ in x[1]] for x in want[1:]]


def _decode_events_during_long_prefill(engine: Engine, long_prompt: list[int]) -> int:
    """Tokens a decoding stream receives between a long prompt's submission and its first token."""
    log: list[str] = []
    first = threading.Event()
    decoding = threading.Event()

    def on_stream(event):
        log.append("stream")
        if event.num_generated >= 3:
            decoding.set()

    def on_long(event):
        log.append("long")
        first.set()

    stream = engine.submit([5, 6, 7], SamplingParams(max_tokens=300, ignore_eos=True), on_stream)
    assert decoding.wait(60)
    log.append("submit")
    engine.submit(long_prompt, SamplingParams(max_tokens=1), on_long)
    assert first.wait(120)
    stream.cancel()
    start = log.index("submit")
    return log[start:log.index("long", start)].count("stream")


def test_decoding_streams_get_tokens_between_chunks(models):
    """A 1,500-token prompt arrives while another request decodes: prefilled in chunks of 128,
    the decoding request receives tokens between the chunks (a decode step after each); in one
    pass it receives none while the prompt is computed."""
    loaded = models("llama-2k")
    long_prompt = [(7 * i) % 400 + 50 for i in range(1500)]
    counts = {}
    for budget in (128, 2048):
        engine = Engine(loaded, max_prefill_tokens=budget, prefix_cache_tokens=0)
        try:
            counts[budget] = _decode_events_during_long_prefill(engine, long_prompt)
        finally:
            engine.shutdown(drain=False, timeout=10)
    assert counts[128] >= 1500 // 128 - 1, counts  # one per chunk but the last
    assert counts[2048] <= 1, counts  # at most a step already under way when the prompt arrived


def test_short_prompt_does_not_wait_for_a_long_one(models):
    """A short prompt submitted with a long one gets its first token first: it is prefilled at the
    next step, between the long prompt's chunks, not after all of them."""
    engine = Engine(models("llama-2k"), max_prefill_tokens=128, prefix_cache_tokens=0)
    firsts: list[str] = []
    done = threading.Semaphore(0)

    def receiver(name: str):
        def receive(event):
            firsts.append(name)
            done.release()
        return receive

    try:
        with engine._cond:  # both waiting when the loop looks: the long one is admitted first
            engine.submit([(3 * i) % 400 + 50 for i in range(1000)], SamplingParams(max_tokens=1), receiver("long"))
            engine.submit([9, 10, 11], SamplingParams(max_tokens=1), receiver("short"))
        assert done.acquire(timeout=120) and done.acquire(timeout=120)
    finally:
        engine.shutdown(drain=False, timeout=10)
    assert firsts == ["short", "long"]


def test_cancel_during_chunked_prefill(models):
    """Cancelling a prompt between its chunks ends it with 'abort' and frees everything; the
    engine goes on serving."""
    engine = Engine(models("llama-2k"), max_prefill_tokens=64, prefix_cache_tokens=0)
    original, chunked, cancelled = engine.forward, threading.Event(), threading.Event()

    def gated_forward(*args):
        if args[0].shape[1] > 1 and not chunked.is_set():  # the first chunk: hold it until cancelled
            chunked.set()
            assert cancelled.wait(30)
        return original(*args)

    events = []
    try:
        engine.forward = gated_forward
        handle = engine.submit(list(range(50, 1050)), SamplingParams(max_tokens=5), events.append)
        assert chunked.wait(60)
        handle.cancel()
        cancelled.set()
        deadline = time.monotonic() + 30
        while (not events or engine.num_running) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [e.finish_reason for e in events] == ["abort"] and events[0].num_generated == 0
        assert engine.num_running == 0 and not engine._jobs and engine._cache is None
        after = run(engine, [[5, 6, 7, 8]], max_tokens=4)[0]
        assert after[-1].finish_reason == "length" and after[-1].num_generated == 4
    finally:
        engine.shutdown(drain=False, timeout=10)
