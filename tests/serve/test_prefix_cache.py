"""Prefix caching: the store's chains and bound, and the engine's outputs with it equal those without it
(greedy tokens equal, logprobs within float noise) on a tiny Llama and on other architectures,
including sliding-window ones; the hit counters in the engine and in a real server's /metrics."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch

from llmquant.serve.engine import Engine
from llmquant.serve.prefix_cache import PrefixCache
from llmquant.serve.sampling import SamplingParams

BLOCK = 16
# Config edits of the architecture matrix's folders: Llama-shaped models whose sliding window
# (8 tokens) the prompts cross (lean forward), next to gemma2 (window 32, transformers' forward).
ARCHITECTURES = {
    "qwen2": ("qwen2", None),
    "gemma2": ("gemma2", None),
    "mistral-window8": ("mistral", dict(sliding_window=8)),
}
SYSTEM = list(range(100, 140))  # a 40-token "system prompt": two full blocks of 16 are cached, not the rest


class _Layer:
    def __init__(self, keys, values):
        self.keys, self.values = keys, values


def _layers(length: int, rows: int = 1):
    """Two cache layers whose column j holds the value j (keys) and -j (values)."""
    cols = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1).expand(rows, 2, length, 4)
    return [_Layer(cols.clone(), -cols.clone()) for _ in range(2)]


def test_store_and_lookup_follow_chains():
    cache = PrefixCache(max_tokens=1024, block_size=4)
    prompt = list(range(10))  # two full blocks (0..7) stored, 8..9 not
    cache.store(prompt, _layers(13), row=0, first_column=3)  # the row's tokens start at column 3
    assert cache.num_tokens == 8
    chain = cache.lookup(prompt + [99], limit=10)
    assert len(chain) == 2
    assert len(cache.lookup(prompt, limit=7)) == 1  # at most `limit` tokens
    assert len(cache.lookup([0, 1, 2, 3, 9, 9, 9, 9], limit=8)) == 1  # the second block differs
    assert cache.lookup([9] + prompt, limit=11) == []  # same tokens, other position: not a prefix
    # Two rows' prefixes right-aligned before column 9: row 0 reuses 8 tokens, row 1 5, row 2 none.
    keys, values = cache.gather([chain, chain[:2], []], [8, 5, 0], 9)[1]
    assert keys.shape == (3, 2, 9, 4)
    assert keys[0, 0, :, 0].tolist() == [0.0] + list(range(3, 11))  # tokens 0..7 sat in columns 3..10
    assert keys[1, 1, :, 0].tolist() == [0.0] * 4 + [3.0, 4.0, 5.0, 6.0, 7.0] and not keys[2].any()
    assert values[0, 0, 1:, 0].tolist() == [-float(c) for c in range(3, 11)]


def test_lru_bound_evicts_chain_ends_first():
    cache = PrefixCache(max_tokens=12, block_size=4)  # three blocks
    a, b = [1] * 8, [2] * 8
    cache.store(a, _layers(8), 0, 0)
    cache.store(b, _layers(8), 0, 0)  # four blocks: a's second block, the least recent chain end, goes
    assert cache.num_tokens == 12
    assert len(cache.lookup(a + [0], 9)) == 1 and len(cache.lookup(b + [0], 9)) == 2
    cache.store([3] * 12, _layers(12), 0, 0)  # a whole new chain of three blocks: everything else goes
    assert cache.lookup(b + [0], 9) == [] and len(cache.lookup([3] * 13, 13)) == 3
    cache.store([4] * 20, _layers(20), 0, 0)  # longer than the bound: its first three blocks are kept
    assert len(cache.lookup([4] * 20, 20)) == 3 and cache.num_tokens == 12
    assert cache.gather([cache.lookup([4] * 20, 20)], [12], 12)[0][0][0, 0, :, 0].tolist() == list(range(12))
    assert PrefixCache(max_tokens=0).max_blocks == 0


@pytest.fixture(scope="module")
def models(architecture_dir, tiny_model_dir, tmp_path_factory):
    """name -> float32 LoadedModel ('llama': the tiny Llama of the other engine tests)."""
    from llmquant import load_model

    loaded = {}

    def get(name: str):
        if name not in loaded:
            if name == "llama":
                folder = tiny_model_dir
            else:
                base, edits = ARCHITECTURES[name]
                folder = architecture_dir(base)
                if edits:
                    folder = shutil.copytree(folder, tmp_path_factory.mktemp("edited") / name)
                    config = json.loads((folder / "config.json").read_text())
                    (folder / "config.json").write_text(json.dumps({**config, **edits}))
            loaded[name] = load_model(folder, dtype="float32")
        return loaded[name]

    return get


def run(engine: Engine, prompts: list[list[int]], max_tokens: int = 10) -> list[tuple[list[int], list[float]]]:
    """Submit `prompts` while the engine loop is held (admitted in one step); each one's greedy
    tokens and their logprobs."""
    out: list[tuple[list[int], list[float]]] = [([], []) for _ in prompts]
    done = threading.Semaphore(0)

    def receiver(k: int):
        def receive(event):
            if event.token_id is not None:
                out[k][0].append(event.token_id)
                out[k][1].append(event.logprob)
            if event.finish_reason is not None:
                done.release()
        return receive

    with engine._cond:
        for k, ids in enumerate(prompts):
            engine.submit(ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=True),
                          receiver(k))
    for _ in prompts:
        assert done.acquire(timeout=120)
    return out


def assert_same(cached, plain):
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(cached, plain):
        assert tokens == want_tokens
        assert logprobs == pytest.approx(want_logprobs, abs=1e-4)


@pytest.mark.parametrize("name", ["llama", *ARCHITECTURES])
def test_outputs_equal_uncached(name, models):
    """Two requests sharing the 40-token system prefix: the second reuses its two full blocks
    (32 tokens); a 33-token prompt computes only its last token; then a group admitted together
    whose rows reuse different lengths (one none, one a prefix longer than another row's whole
    prompt). Every output equals the engine's without a prefix cache."""
    loaded = models(name)
    first, second, third = SYSTEM + [5, 6, 7, 8, 9], SYSTEM + [11, 12, 13], SYSTEM[:33]
    group = [SYSTEM + [21] * 30, [300, 301, 302], SYSTEM[:35], SYSTEM + [5, 6, 7, 8, 9, 10, 11]]
    plain = Engine(loaded, prefix_cache_tokens=0)
    try:
        want = [run(plain, [first]), run(plain, [second]), run(plain, [third]), run(plain, group)]
        assert plain.prefix_cache_queries == 0 and plain.prefix_cache_hit_rate == 0.0
    finally:
        plain.shutdown(drain=False, timeout=10)
    engine = Engine(loaded)
    try:
        got = [run(engine, [first])]
        assert (engine.prefix_cache_queries, engine.prefix_cache_hits) == (len(first), 0)
        got.append(run(engine, [second]))
        assert (engine.prefix_cache_queries, engine.prefix_cache_hits) == (len(first) + len(second), 32)
        assert engine.prefix_cache_hit_rate == pytest.approx(32 / (len(first) + len(second)))
        got.append(run(engine, [third]))
        assert engine.prefix_cache_hits == 64
        got.append(run(engine, group))
        assert engine.prefix_cache_hits == 64 + 32 + 9  # rows reuse 32, 0, 0 and 9 tokens: see prefill.plan
    finally:
        engine.shutdown(drain=False, timeout=10)
    for cached, uncached in zip(got, want):
        assert_same(cached, uncached)


def test_prompt_logprobs_bypass_the_cache(models):
    """Prompt logprobs need logits at every prompt position: such a request computes its whole
    prompt (and is not counted as a lookup), with the same logprobs as without a cache."""
    loaded = models("llama")
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=True, ignore_eos=True)
    engine = Engine(loaded)
    try:
        list(engine.generate(SYSTEM + [1, 2], SamplingParams(temperature=0, max_tokens=2)))
        queries = engine.prefix_cache_queries
        events = list(engine.generate(SYSTEM + [3], params))
        assert engine.prefix_cache_queries == queries
    finally:
        engine.shutdown(drain=False, timeout=10)
    plain = Engine(loaded, prefix_cache_tokens=0)
    try:
        want = list(plain.generate(SYSTEM + [3], params))
    finally:
        plain.shutdown(drain=False, timeout=10)
    got_lp, want_lp = events[0].prompt_logprobs, want[0].prompt_logprobs
    assert [e.token_id for e in events] == [e.token_id for e in want]
    assert [x[0] for x in got_lp[1:]] == pytest.approx([x[0] for x in want_lp[1:]], abs=1e-5)


def test_server_metrics_count_hits(server, client, tiny_loaded):
    """Through a real server: the second of two completions sharing a 40-token prefix finds its
    two full blocks; /metrics counts the tokens looked up and found; both completions equal
    those of an engine without a prefix cache."""
    prefix = list(range(200, 240))  # token ids no other test sends: the first request finds nothing
    prompts = [prefix + [7, 8, 9], prefix + [17, 18]]
    queries = server.metric("llmquant:prefix_cache_queries_total")
    hits = server.metric("llmquant:prefix_cache_hits_total")
    texts = []
    for k, prompt in enumerate(prompts):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        texts.append(r.choices[0].text)
        assert server.metric("llmquant:prefix_cache_hits_total") - hits == (0, 32)[k]
    assert server.metric("llmquant:prefix_cache_queries_total") - queries == sum(map(len, prompts))
    plain = Engine(tiny_loaded, prefix_cache_tokens=0)
    try:
        want = ["".join(e.text for e in plain.generate(p, SamplingParams(temperature=0, max_tokens=8,
                                                                         ignore_eos=True)))
                for p in prompts]
    finally:
        plain.shutdown(drain=False, timeout=10)
    assert texts == want
