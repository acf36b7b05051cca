"""Perplexity over HTTP and the load generator, against our own `llmquant serve` process."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmquant.eval import perplexity
from llmquant.eval.endpoint import EndpointError
from llmquant.eval.loadgen import load_test, percentile
from llmquant.eval.remote import remote_perplexity
from llmquant.eval.server_process import ServerProcess


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with ServerProcess(tiny_model_dir, "--dtype", "float32", "--max-model-len", "512",
                       "--served-model-name", "tiny", "--api-key", "sesame") as srv:
        yield srv


def test_remote_perplexity_equals_the_local_one(server, tiny_model_dir, one_thread):
    local = perplexity(str(tiny_model_dir), max_tokens=700, window=256, stride=128, dtype="float32",
                       progress=False)
    remote = remote_perplexity(server.base_url, "tiny", api_key="sesame", tokenizer=str(tiny_model_dir),
                               base=str(tiny_model_dir), max_tokens=700, window=256, stride=128, batch_size=2,
                               progress=False)
    assert remote.num_tokens_scored == local.num_tokens_scored == 699
    assert remote.perplexity == pytest.approx(local.perplexity, rel=1e-4)
    assert remote.bits_per_byte == pytest.approx(local.bits_per_byte, rel=1e-4)
    assert np.allclose(remote.per_window, local.per_window, rtol=1e-4)
    # The same weights behind the server: the argmax agrees except where two tokens decode to
    # the same text or tie.
    assert remote.top1_agreement >= 0.95
    assert remote.method["window"] == 256 and remote.method["stride"] == 128
    assert "echo=true" in remote.method["how"]


def test_wrong_api_key_is_a_clear_error(server, tiny_model_dir):
    with pytest.raises(EndpointError, match="HTTP 401"):
        remote_perplexity(server.base_url, "tiny", api_key="wrong", tokenizer=str(tiny_model_dir), max_tokens=100,
                          progress=False)


def test_fixed_concurrency_load_counts_every_token(server, tiny_model_dir):
    r = load_test(server.base_url, "tiny", api_key="sesame", tokenizer=str(tiny_model_dir), concurrency=3,
                  num_prompts=6, input_len=24, output_len=8, progress=False)
    assert (r.completed, r.failed, r.errors) == (6, 0, [])
    assert r.total_output_tokens == 6 * 8 and r.total_input_tokens == 6 * 24  # ignore_eos honoured
    assert r.request_throughput == pytest.approx(6 / r.duration_s)
    assert r.output_throughput == pytest.approx(48 / r.duration_s)
    for stats in (r.ttft_ms, r.tpot_ms, r.itl_ms, r.e2e_ms):
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    assert r.e2e_ms["p50"] >= r.ttft_ms["p50"]
    assert r.e2e_ms["mean"] > r.ttft_ms["mean"] + r.tpot_ms["mean"]  # the rest of 7 tokens after the first
    assert r.method["concurrency"] == 3 and r.method["request_rate"] is None


def test_poisson_arrivals_and_synthetic_prompts(server, tiny_model_dir):
    r = load_test(server.base_url, "tiny", api_key="sesame", tokenizer=str(tiny_model_dir), concurrency=None,
                  request_rate=40.0, num_prompts=5, input_len=16, output_len=4, prompts="synthetic", progress=False)
    assert (r.completed, r.failed) == (5, 0)
    assert r.total_input_tokens == 5 * 16 and r.total_output_tokens == 5 * 4


def test_a_wrong_model_name_fails_at_the_warm_up(server, tiny_model_dir):
    with pytest.raises(EndpointError, match="404"):
        load_test(server.base_url, "no-such-model", api_key="sesame", tokenizer=str(tiny_model_dir), concurrency=1,
                  num_prompts=2, input_len=8, output_len=2, progress=False)


def test_percentiles_match_numpy():
    values = sorted([3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.3])
    for q in (0, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert math.isnan(load_test.__globals__["stats_ms"]([])["p50"])


def test_a_suite_measures_a_server_by_its_url(server, tiny_model_dir, tmp_path, monkeypatch):
    from llmquant.eval.suite import SuiteConfig, run_suite

    monkeypatch.setenv("TINY_KEY", "sesame")
    config = SuiteConfig.from_dict({
        "models": [{"name": "local", "source": str(tiny_model_dir), "dtype": "float32", "tasks": ["perplexity"]},
                   {"name": "served", "url": server.base_url, "served_model": "tiny", "api_key_env": "TINY_KEY",
                    "tokenizer": str(tiny_model_dir)}],
        "tasks": [{"task": "perplexity", "max_tokens": 300, "window": 128},
                  {"task": "agreement", "max_tokens": 300, "window": 128},
                  {"task": "throughput"},
                  {"task": "load", "concurrency": [2], "num_prompts": 2, "input_len": 8, "output_len": 2}]})
    results = run_suite(config, tmp_path / "out", progress=False)
    entries = {(e["model"], e["task"]): e for e in results["results"]}
    local, served = entries[("local", "perplexity")], entries[("served", "perplexity")]
    assert served["status"] == "ok" and served["result"]["method"]["endpoint"] == server.base_url
    assert served["result"]["perplexity"] == pytest.approx(local["result"]["perplexity"], rel=1e-4)
    agreement = entries[("served", "agreement")]["result"]
    assert agreement["kl_mean"] is None and agreement["top1_agreement"] >= 0.95
    assert entries[("served", "throughput")]["status"] == "skipped"
    assert entries[("served", "load")]["result"]["runs"][0]["completed"] == 2
    assert "sesame" not in (tmp_path / "out" / "results.json").read_text()  # the key itself is never written
