"""The generation engine on the tiny model: exact greedy outputs under continuous batching,
cancellation, seeds, stops, limits, logprobs."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from llmquant.serve.events import ContextLengthError, EngineBusyError
from llmquant.serve.sampling import InvalidRequestError, SamplingParams

PROMPTS = ["The quick brown fox", "def main():\n    return", "In the beginning", "import os\nimport sys\n",
           "x", "Python's documentation says that exceptions"]


def reference_greedy(loaded, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    pad_token_id=0)
    return out[0, len(ids):].tolist()


def tokens(events) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


def test_concurrent_greedy_matches_generate(engine, tiny_loaded):
    """Sequences that join a running batch at different steps get exactly the tokens that
    transformers' generate() gives each alone (left padding and per-row positions are exact)."""
    ids = [tiny_loaded.tokenizer(p).input_ids for p in PROMPTS]
    lengths = [24, 8, 16, 30, 12, 20]
    results: dict[int, list[int]] = {}

    def run(k: int) -> None:
        time.sleep(0.03 * k)  # staggered: later ones join mid-decode
        params = SamplingParams(temperature=0, max_tokens=lengths[k], ignore_eos=True)
        results[k] = tokens(engine.generate(ids[k], params))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(len(ids)):
        assert results[k] == reference_greedy(tiny_loaded, ids[k], lengths[k]), k


def test_requests_admitted_together_share_one_padded_prefill(tiny_loaded):
    """Prompts of different lengths admitted in the same step are prefilled in one left-padded
    forward pass and then decode together; each still gets exactly what generate() gives it
    alone, including a row that finishes during the prefill (max_tokens=1)."""
    from llmquant.serve.engine import Engine

    ids = [tiny_loaded.tokenizer(p).input_ids for p in PROMPTS]
    lengths = [24, 1, 16, 30, 12, 20]
    eng = Engine(tiny_loaded)
    forwards: list[tuple[int, ...]] = []
    hook = tiny_loaded.model.model.embed_tokens.register_forward_hook(
        lambda module, args, out: forwards.append(tuple(args[0].shape)))
    try:
        events: dict[int, list] = {k: [] for k in range(len(ids))}
        done = threading.Semaphore(0)

        def on_event(k):
            def receive(e):
                events[k].append(e)
                if e.finish_reason is not None:
                    done.release()
            return receive

        with eng._cond:  # hold the engine loop so that every request is waiting when it looks
            for k in range(len(ids)):
                eng.submit(ids[k], SamplingParams(temperature=0, max_tokens=lengths[k], ignore_eos=True),
                           on_event(k))
        for _ in ids:
            assert done.acquire(timeout=60)
    finally:
        hook.remove()
        eng.shutdown(drain=False, timeout=10)
    assert forwards[0] == (len(ids), max(map(len, ids)))  # one prefill for all, padded to the longest
    for k in range(len(ids)):
        assert tokens(events[k]) == reference_greedy(tiny_loaded, ids[k], lengths[k]), k


def test_late_request_joins_running_batch(engine, tiny_loaded):
    """A short request submitted while a long one decodes finishes first: it joined the batch
    instead of waiting for the long one to end."""
    ids = tiny_loaded.tokenizer("The quick brown fox").input_ids
    order: list[str] = []
    started = threading.Event()

    def long_request():
        for e in engine.generate(ids, SamplingParams(temperature=0, max_tokens=150, ignore_eos=True)):
            if e.num_generated == 5:
                started.set()
        order.append("long")

    t = threading.Thread(target=long_request)
    t.start()
    assert started.wait(60)
    short = tokens(engine.generate(ids[:3], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)))
    order.append("short")
    t.join()
    assert order == ["short", "long"]
    assert short == reference_greedy(tiny_loaded, ids[:3], 5)


def test_cancel_frees_slot_and_cache(engine, tiny_loaded):
    ids = tiny_loaded.tokenizer("The quick brown fox").input_ids
    stream = engine.generate(ids, SamplingParams(temperature=0.7, max_tokens=200, ignore_eos=True))
    for _, _event in zip(range(5), stream):
        pass
    assert engine.num_running == 1
    stream.close()  # the consumer walks away
    deadline = time.monotonic() + 10
    while engine.num_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_running == 0
    assert engine._cache is None and engine._mask is None


def test_seed_reproducible_and_distinct(engine, tiny_loaded):
    ids = tiny_loaded.tokenizer("In the beginning").input_ids

    def sample(seed):
        return tokens(engine.generate(ids, SamplingParams(temperature=1.0, max_tokens=24, seed=seed,
                                                          ignore_eos=True)))

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_stop_string_truncates_text(engine, tiny_loaded):
    tok = tiny_loaded.tokenizer
    ids = tok("Python's documentation says that exceptions").input_ids
    free = "".join(e.text for e in engine.generate(ids, SamplingParams(temperature=0, max_tokens=30,
                                                                         ignore_eos=True)))
    stop = free[len(free) // 2:len(free) // 2 + 2]
    events = list(engine.generate(ids, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=(stop,))))
    text = "".join(e.text for e in events)
    assert events[-1].finish_reason == "stop"
    assert text == free[:free.index(stop)]


def test_stop_token_id_and_length(engine, tiny_loaded):
    ids = tiny_loaded.tokenizer("import os\nimport sys\n").input_ids
    free = reference_greedy(tiny_loaded, ids, 12)
    events = list(engine.generate(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)))
    assert events[-1].finish_reason == "length" and events[-1].num_generated == 12
    stop_id = free[5]
    events = list(engine.generate(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                      stop_token_ids=(stop_id,))))
    assert events[-1].finish_reason == "stop"
    assert tokens(events) == free[:free.index(stop_id) + 1]


def test_context_length_enforced_before_generation(engine):
    limit = engine.max_model_len
    with pytest.raises(ContextLengthError, match=f"maximum context length is {limit}"):
        engine.submit([1] * limit, SamplingParams(), lambda e: None)
    with pytest.raises(ContextLengthError) as info:
        engine.submit([1] * 10, SamplingParams(max_tokens=limit), lambda e: None)
    assert info.value.param == "max_tokens"
    assert engine.num_waiting == 0 and engine.num_running == 0


def test_full_queue_is_busy(tiny_loaded):
    from llmquant.serve.engine import Engine

    eng = Engine(tiny_loaded, max_batch_size=1, max_waiting=1)
    try:
        first = threading.Event()
        eng.submit([5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True), lambda e: first.set())
        assert first.wait(30)  # running, so the queue itself is empty
        eng.submit([5, 6, 7], SamplingParams(max_tokens=5), lambda e: None)  # waits
        with pytest.raises(EngineBusyError, match="busy"):
            eng.submit([5, 6, 7], SamplingParams(max_tokens=5), lambda e: None)
    finally:
        eng.shutdown(drain=False, timeout=10)


def test_prompt_and_token_logprobs_match_model(engine, tiny_loaded):
    ids = tiny_loaded.tokenizer("def main():\n    return").input_ids
    events = list(engine.generate(ids, SamplingParams(temperature=0, max_tokens=2, logprobs=True, top_logprobs=3,
                                                      prompt_logprobs=True, ignore_eos=True)))
    with torch.inference_mode():
        full = ids + [events[0].token_id]
        lp = torch.log_softmax(tiny_loaded.model(torch.tensor([full])).logits[0].float(), dim=-1)
    prompt_lp = events[0].prompt_logprobs
    assert prompt_lp[0] is None and len(prompt_lp) == len(ids)
    for i in range(1, len(ids)):
        assert prompt_lp[i][0] == pytest.approx(lp[i - 1, ids[i]].item(), abs=1e-4)
        assert [t for t, _ in prompt_lp[i][1]] == lp[i - 1].topk(3).indices.tolist()
    first = events[0]
    assert first.logprob == pytest.approx(lp[len(ids) - 1].max().item(), abs=1e-4)  # greedy: the top token
    assert first.top_logprobs[0][0] == first.token_id


def test_scoring_only_request(engine, tiny_loaded):
    ids = tiny_loaded.tokenizer("In the beginning").input_ids
    events = list(engine.generate(ids, SamplingParams(max_tokens=0, prompt_logprobs=True)))
    assert len(events) == 1 and events[0].token_id is None and events[0].finish_reason == "length"
    assert len(events[0].prompt_logprobs) == len(ids)
    with pytest.raises(InvalidRequestError):
        SamplingParams(max_tokens=0)


def test_frequency_penalty_reduces_repetition(engine, tiny_loaded):
    ids = tiny_loaded.tokenizer("The quick brown fox").input_ids

    def most_repeated(penalty):
        out = tokens(engine.generate(ids, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                         frequency_penalty=penalty)))
        return max(out.count(t) for t in set(out))

    assert most_repeated(2.0) < most_repeated(0.0)


def test_shutdown_drains_running_requests(tiny_loaded):
    from llmquant.serve.engine import Engine
    from llmquant.serve.events import EngineStoppedError

    eng = Engine(tiny_loaded)
    events = []
    eng.submit([5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True), events.append)
    eng.shutdown(drain=True, timeout=60)
    assert events[-1].finish_reason == "length" and events[-1].num_generated == 40
    with pytest.raises(EngineStoppedError):
        eng.submit([5, 6, 7], SamplingParams(max_tokens=4), events.append)
