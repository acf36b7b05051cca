"""Offline throughput through the engine on the tiny model: what is counted, capped and measured."""

from __future__ import annotations

import pytest

from llmquant.eval.throughput import checkpoint_bytes, offline_throughput
from llmquant.errors import InvalidConfigError


def test_throughput_counts_tokens_and_caps_lengths_by_the_context(tiny_model_dir, one_thread):
    r = offline_throughput(str(tiny_model_dir), prefill_lengths=(16, 128, 4096), batch_sizes=(1, 4),
                           decode_tokens=6, prompt_tokens=16, dtype="float32", progress=False)
    # The tiny model's context is 512: 4096 becomes 511 (one position for the produced token).
    assert [p["prompt_tokens"] for p in r.prefill] == [16, 128, 511]
    assert r.skipped == ["prefill 4096: capped to 511 by the context (512 tokens)"]
    for p in r.prefill:
        assert p["tokens_per_s"] == pytest.approx(p["prompt_tokens"] / p["seconds"])
    # All B requests are prefilled in one step, then decode together: each contributes the
    # tokens after its first one.
    assert [(d["batch_size"], d["tokens"]) for d in r.decode] == [(1, 5), (4, 20)]
    assert all(d["tokens_per_s"] > 0 for d in r.decode)
    assert r.checkpoint_bytes == sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    assert r.checkpoint_bytes == checkpoint_bytes(tiny_model_dir)
    assert r.load_seconds > 0 and r.peak_rss_bytes > 50 * 2**20
    assert r.cuda_peak_allocated_bytes is None and r.method["device"] == "cpu"


def test_impossible_settings_are_refused(tiny_model_dir):
    with pytest.raises(InvalidConfigError, match="decode_tokens"):
        offline_throughput(str(tiny_model_dir), decode_tokens=1, progress=False)
