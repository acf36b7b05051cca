"""Sampling: the filters keep what they should, the parameters refuse what they should."""

from __future__ import annotations

import pytest
import torch

from llmquant.serve.sampling import InvalidRequestError, SamplingParams, apply_penalties, choose_token


def test_top_k_and_top_p_keep_only_the_head():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    picks = {choose_token(logits, SamplingParams(top_k=2), gen) for _ in range(200)}
    assert picks == {0, 1}
    # softmax mass of the top two is 0.90: top_p 0.85 keeps exactly them
    picks = {choose_token(logits, SamplingParams(top_p=0.85), gen) for _ in range(200)}
    assert picks == {0, 1}


def test_tiny_top_p_still_returns_the_top_token():
    logits = torch.randn(512, generator=torch.Generator().manual_seed(1))
    assert choose_token(logits, SamplingParams(top_p=5e-324), None) == int(logits.argmax())


def test_penalties_follow_openai_definition():
    logits = torch.zeros(4)
    out = apply_penalties(logits, {1: 3, 2: 1}, SamplingParams(frequency_penalty=0.5, presence_penalty=0.25))
    assert out.tolist() == [0.0, -1.75, -0.75, 0.0]


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"), (dict(max_tokens=0), "max_tokens"),
    (dict(stop=("",)), "stop"), (dict(top_logprobs=21), "top_logprobs"), (dict(frequency_penalty=3), "frequency_penalty"),
])
def test_invalid_values_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
