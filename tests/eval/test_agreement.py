"""KL divergence and top-1 agreement against a base model, checked against direct computations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from llmquant.eval import perplexity
from llmquant.eval.agreement import agreement
from llmquant.data import evaluation_tokens
from llmquant.errors import InvalidConfigError


@pytest.fixture(scope="module")
def models(tiny_model_dir, one_thread):
    """The tiny model, and a copy with noise added to every weight matrix (same tokenizer)."""
    from llmquant import load_model

    base = load_model(tiny_model_dir, dtype="float32")
    other = copy.deepcopy(base.model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            if p.ndim == 2:
                p.add_(0.5 * p.std() * torch.randn(p.shape, generator=gen))
    return base, (other, base.tokenizer)


def test_a_model_agrees_with_itself_exactly(models):
    base, _ = models
    r = agreement(base, base, max_tokens=600, window=256, progress=False)
    assert r.kl_mean == pytest.approx(0.0, abs=1e-7) and r.kl_max == pytest.approx(0.0, abs=1e-6)
    assert r.top1_agreement == 1.0
    assert r.perplexity == r.base_perplexity
    reference = perplexity(base, max_tokens=600, window=256, progress=False)
    assert r.num_tokens_scored == reference.num_tokens_scored == 600 - 3
    assert r.perplexity == pytest.approx(reference.perplexity, rel=1e-9)


def test_kl_and_top1_equal_a_direct_computation_on_one_window(models):
    base, other = models
    ids = evaluation_tokens(base.tokenizer, max_tokens=200)
    with torch.no_grad():
        lp_base = torch.log_softmax(base.model(ids[None]).logits[0, :-1].float(), -1)
        lp_other = torch.log_softmax(other[0](ids[None]).logits[0, :-1].float(), -1)
    kl = F.kl_div(lp_other, lp_base, log_target=True, reduction="none").sum(-1)  # KL(base || other) per position
    top1 = (lp_base.argmax(-1) == lp_other.argmax(-1)).double().mean().item()
    r = agreement(other, base, max_tokens=200, window=256, progress=False)
    assert r.num_tokens_scored == 199
    assert r.kl_mean == pytest.approx(kl.double().mean().item(), rel=1e-4)
    assert r.kl_max == pytest.approx(kl.max().item(), rel=1e-4)
    assert r.top1_agreement == pytest.approx(top1)
    assert r.top1_agreement < 1 and r.kl_mean > 1e-3
    assert r.kl_median <= r.kl_p99 <= r.kl_max
    assert r.method["kl"].startswith("KL(P_base || P_model)")


def test_different_tokenizers_are_refused(models):
    base, _ = models
    tokenizer = copy.deepcopy(base.tokenizer)
    tokenizer.add_tokens(["<extra-one>", "<extra-two>"])
    with pytest.raises(InvalidConfigError, match="different tokenizers"):
        agreement((base.model, tokenizer), base, max_tokens=100, progress=False)
