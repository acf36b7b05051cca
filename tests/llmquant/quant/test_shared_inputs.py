"""SharedInputs: layers called on the very same tensor share one statistic, which only the first
accumulates; a layer on another tensor (even an equal one) gets its own."""

import torch

from llmquant.quant.algorithms.gptq import HessianSum
from llmquant.quant.algorithms.shared_inputs import SharedInputs


def test_layers_on_one_tensor_share_the_first_ones_statistic():
    shared = SharedInputs(HessianSum)
    for _ in range(3):  # three calibration batches through an attention block
        x, attn = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
        for name in ("q", "k", "v"):
            entry = shared.observe(name, x)
            if entry is not None:
                entry.add(x)
        o = shared.observe("o", attn.clone())
        o.add(attn)
        assert shared.observe("o2", attn) is not None  # equal values, another tensor: its own statistic
    assert shared.groups() == {"q": ["q", "k", "v"], "o": ["o"], "o2": ["o2"]}
    assert shared.entries["k"] is shared.entries["q"] and shared.entries["o"] is not shared.entries["q"]
    assert shared.entries["q"].n == 3 * 10  # accumulated once per batch, not three times
    assert shared.entries["o2"].n == 0  # the test never fed it: nothing is added behind the caller's back


def test_a_forgotten_layer_starts_again():
    shared = SharedInputs(HessianSum)
    x = torch.randn(4, 8)
    shared.observe("gate", x).add(x)
    assert shared.observe("up", x) is None
    shared.forget("up")
    y = torch.randn(4, 8)
    entry = shared.observe("up", y)
    assert entry is not None and entry is not shared.entries["gate"] and shared.owners["up"] == "up"
