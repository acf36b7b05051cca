"""Sliding-window perplexity on the tiny model, checked against references computed directly."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from llmquant.eval import perplexity
from llmquant.data import evaluation_stream, evaluation_tokens
from llmquant.errors import InvalidConfigError


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_one_window_equals_the_nll_of_one_full_forward(tiny):
    model, tokenizer = tiny
    ids = evaluation_tokens(tokenizer, max_tokens=300)
    with torch.no_grad():
        logits = model(ids[None]).logits[0].float()
    reference = F.cross_entropy(logits[:-1], ids[1:], reduction="none")
    result = perplexity(tiny, max_tokens=300, window=512, progress=False)
    assert result.num_tokens_scored == 299
    assert result.method["num_windows"] == 1
    assert result.nll_per_token == pytest.approx(reference.mean().item(), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(reference.mean().item()), rel=1e-5)


def _transformers_guide_nll(model, ids, window, stride):
    """The loop of the transformers guide "Perplexity of fixed-length models", using the
    model's own loss; each window's mean is weighted by the number of labels it averaged."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + window, ids.numel())
        trg_len = end - prev_end
        input_ids = ids[begin:end][None]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        counted = int((target_ids[:, 1:] != -100).sum())  # labels left after the shift
        nll_sum += loss.item() * counted
        n_tokens += counted
        prev_end = end
        if end == ids.numel():
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("window,stride", [(128, 48), (128, 128), (100, 99)])
def test_sliding_windows_match_the_transformers_guide(tiny, window, stride):
    model, tokenizer = tiny
    ids = evaluation_tokens(tokenizer, max_tokens=400)
    expected_nll, expected_count = _transformers_guide_nll(model, ids, window, stride)
    result = perplexity(tiny, max_tokens=400, window=window, stride=stride, progress=False)
    assert result.num_tokens_scored == expected_count
    assert result.nll_per_token == pytest.approx(expected_nll, rel=1e-5)
    assert len(result.per_window) == result.method["num_windows"]


def test_batching_windows_does_not_change_the_result(tiny):
    one = perplexity(tiny, max_tokens=1500, window=128, stride=64, progress=False)
    batched = perplexity(tiny, max_tokens=1500, window=128, stride=64, batch_size=5, progress=False)
    assert batched.num_tokens_scored == one.num_tokens_scored
    assert batched.nll_per_token == pytest.approx(one.nll_per_token, rel=1e-5)
    assert batched.per_window == pytest.approx(one.per_window, rel=1e-4)


def test_uniform_logits_give_perplexity_equal_to_the_vocabulary_size(tiny):
    model, tokenizer = tiny
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        uniform.get_output_embeddings().weight.zero_()  # every logit 0: p = 1/V for every token
    vocab = uniform.get_output_embeddings().weight.shape[0]
    result = perplexity((uniform, tokenizer), max_tokens=1000, progress=False)
    assert result.perplexity == pytest.approx(vocab, rel=1e-5)
    stream = evaluation_stream(tokenizer, max_tokens=1000)
    expected_bpb = math.log2(vocab) * result.num_tokens_scored / stream.num_bytes
    assert result.bits_per_byte == pytest.approx(expected_bpb, rel=1e-6)


def test_a_model_that_has_seen_the_text_beats_uniform(tiny):
    model, tokenizer = tiny
    ids = evaluation_tokens(tokenizer, max_tokens=512)
    before = perplexity(tiny, max_tokens=512, window=256, progress=False)
    trained = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    batch = ids.view(2, 256)
    for _ in range(25):  # a few seconds: enough to memorize much of 512 tokens
        loss = trained(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = perplexity((trained.eval(), tokenizer), max_tokens=512, window=256, progress=False)
    vocab = trained.config.vocab_size
    assert after.perplexity < vocab / 4
    assert after.perplexity < before.perplexity / 2


def test_bits_per_byte_is_nll_in_bits_over_bytes(tiny):
    _, tokenizer = tiny
    result = perplexity(tiny, max_tokens=800, progress=False)
    stream = evaluation_stream(tokenizer, max_tokens=800)
    assert result.num_bytes == stream.num_bytes
    expected = result.nll_per_token * result.num_tokens_scored / math.log(2) / stream.num_bytes
    assert result.bits_per_byte == pytest.approx(expected, rel=1e-9)
    as_dict = result.to_dict()
    for key in ("perplexity", "nll_per_token", "num_tokens_scored", "bits_per_byte", "per_window",
                "method", "seconds", "model"):
        assert key in as_dict
    assert as_dict["method"]["normalization"] == "token"


def test_window_longer_than_the_context_is_rejected(tiny):
    with pytest.raises(InvalidConfigError, match="context length"):
        perplexity(tiny, max_tokens=100, window=4096, progress=False)


def test_a_loaded_model_is_used_as_is(tiny, tiny_model_dir):
    from llmquant.loading import load_model

    loaded = load_model(tiny_model_dir, dtype="float32")
    from_loaded = perplexity(loaded, max_tokens=600, progress=False)
    from_pair = perplexity(tiny, max_tokens=600, progress=False)
    assert from_loaded.model == loaded.source.describe()
    assert from_loaded.method["dtype"] == "float32"
    assert from_loaded.nll_per_token == pytest.approx(from_pair.nll_per_token, rel=1e-5)
