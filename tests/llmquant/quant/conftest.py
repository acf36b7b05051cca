"""Fixtures shared by the GPTQ tests."""

import pytest
import torch

from llmquant.quant.algorithms.gptq import accumulate_hessian


@pytest.fixture(scope="module")
def layer():
    """A (96, 128) weight and correlated inputs with a few loud channels, like a real layer's."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 128, generator=g)
    x = torch.randn(2048, 24, generator=g) @ torch.randn(24, 128, generator=g) + 0.3 * torch.randn(2048, 128, generator=g)
    x[:, :4] *= 8.0
    h, n = None, 0
    for chunk in x.split(300):
        h, n = accumulate_hessian(h, n, chunk)
    return w, x, h
