"""Pruning one weight matrix: the masks' patterns, SparseGPT against a plain reading of the
paper's algorithm, and GPTQ rounding a pruned weight with its mask held fixed."""

import pytest
import torch

from llmquant.config.args import QuantArgs
from llmquant.config.sparsity import SparsityConfig
from llmquant.errors import InvalidConfigError
from llmquant.prune.masks import follows_n_of_m, keep_highest, keep_n_of_m
from llmquant.prune.methods import prune_weight
from llmquant.quant.algorithms.gptq import gptq_quantize_weight
from llmquant.quant.algorithms.gptq_handler import output_sqnr_db


@pytest.fixture(scope="module")
def layer():
    # Inputs with correlated columns and a few loud ones, as LLM activations have.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g)
    x = torch.randn(2048, 256, generator=g) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g) / 16)
    x[:, torch.randperm(256, generator=g)[:8]] *= 6.0
    return w, 2 * x.t() @ x / x.shape[0]


def _reference_sparsegpt(W, H, sparsity, block=128, damp=0.01):
    """SparseGPT as its paper's pseudo-code reads (unstructured, per-block threshold)."""
    W, H = W.clone(), H.clone()
    cols = W.shape[1]
    H += damp * torch.diag(H).mean() * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        tmp = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
        # `<`: exactly the fraction asked (the published code's `<=` prunes one weight more per block)
        prune = tmp < torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
        for i in range(i2 - i1):
            q = W1[:, i].clone()
            q[prune[:, i]] = 0
            Q1[:, i] = q
            err = (W1[:, i] - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


def test_masks_keep_what_they_say():
    scores = torch.arange(24.0).reshape(2, 12)
    assert follows_n_of_m(keep_n_of_m(scores, 2, 4), 2, 4) and keep_n_of_m(scores, 2, 4).sum() == 12
    assert keep_n_of_m(scores, 2, 4)[0].tolist() == [False, False, True, True] * 3
    per_row = keep_highest(scores, 0.25, per_row=True)
    assert per_row.sum(1).tolist() == [9, 9] and not per_row[:, :3].any()
    whole = keep_highest(scores, 0.5, per_row=False)
    assert not whole[0].any() and whole[1].all()
    with pytest.raises(ValueError, match="multiple of 4"):
        keep_n_of_m(torch.ones(2, 6), 2, 4)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "admm"])
def test_every_method_prunes_to_its_pattern(layer, method, pattern):
    w, h = layer
    r = prune_weight(w, h, SparsityConfig(method=method, pattern=pattern))
    assert torch.equal(r.weight == 0, ~r.keep)
    assert abs((~r.keep).float().mean().item() - 0.5) < 1e-3
    if pattern != "unstructured":
        n, m = map(int, pattern.split(":"))
        assert follows_n_of_m(r.keep, n, m)
    if method in ("magnitude", "wanda"):  # kept weights are the original's; sparsegpt and admm update them
        assert torch.equal(r.weight[r.keep], w[r.keep])


def test_sparsegpt_is_the_papers_algorithm(layer):
    w, h = layer
    ours = prune_weight(w, h, SparsityConfig(method="sparsegpt", sparsity=0.6)).weight
    torch.testing.assert_close(ours, _reference_sparsegpt(w, h, 0.6), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_data_aware_methods_beat_magnitude_on_the_layer_outputs(layer, pattern):
    w, h = layer
    err = {m: output_sqnr_db(w, prune_weight(w, h, SparsityConfig(method=m, pattern=pattern)).weight, h)
           for m in ("magnitude", "wanda", "sparsegpt")}
    assert err["wanda"] > err["magnitude"] + 0.5, err
    assert err["sparsegpt"] > err["wanda"] + 0.5, err


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_admm_leaves_less_output_error_than_sparsegpt(layer, pattern):
    w, h = layer
    err = {m: output_sqnr_db(w, prune_weight(w, h, SparsityConfig(method=m, pattern=pattern)).weight, h)
           for m in ("sparsegpt", "admm")}
    assert err["admm"] > err["sparsegpt"] + 0.3, err
    # More iterations converge further: never worse by more than noise.
    longer = prune_weight(w, h, SparsityConfig(method="admm", pattern=pattern, iterations=60)).weight
    assert output_sqnr_db(w, longer, h) > err["admm"] - 0.05


def test_admm_kept_weights_are_the_least_squares_solution(layer):
    """With the mask fixed, the kept weights of each row minimize its output error: the gradient
    of tr(dW H dW^T) vanishes on them (up to the dampening's pull towards the original)."""
    w, h = layer
    r = prune_weight(w, h, SparsityConfig(method="admm", pattern="2:4", iterations=200))
    grad = ((r.weight - w) @ h) * r.keep
    assert grad.norm() / (w @ h).norm() < 0.02


def test_admm_prunes_inputs_that_are_always_zero_first(layer):
    w, h = layer
    h = h.clone()
    h[:, :4] = 0
    h[:4, :] = 0  # the first four inputs never fire: their weights cost nothing to drop
    r = prune_weight(w, h, SparsityConfig(method="admm", sparsity=0.3))
    assert not r.keep[:, :4].any() and torch.isfinite(r.weight).all()


@pytest.mark.parametrize("args", [
    QuantArgs(num_bits=4, strategy="group", group_size=32),
    QuantArgs(num_bits=4, strategy="group", group_size=32, symmetric=False),
    QuantArgs(num_bits=8, strategy="channel"),
    QuantArgs(num_bits=8, type="float", strategy="channel"),
], ids=["int4-sym", "int4-asym", "int8", "fp8"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_keeps_the_pruned_weights_exactly_zero(layer, args, act_order):
    w, h = layer
    pruned = prune_weight(w, h, SparsityConfig(method="sparsegpt", pattern="2:4"))
    q = gptq_quantize_weight(pruned.weight, h, args, act_order=act_order, keep=pruned.keep)
    assert torch.equal(q.dequantized == 0, ~pruned.keep | (q.dequantized == 0))
    assert (q.dequantized[~pruned.keep] == 0).all()
    assert follows_n_of_m(q.dequantized != 0, 2, 4)
    # GPTQ's feedback around a fixed mask beats rounding the pruned weight with no mask in mind.
    plain = gptq_quantize_weight(pruned.weight, h, args, act_order=act_order)
    assert (plain.dequantized[~pruned.keep] != 0).any()  # without the mask, GPTQ refills pruned weights
    assert output_sqnr_db(w, q.dequantized, h) > output_sqnr_db(w, pruned.weight, h) - 3.0


@pytest.mark.parametrize("bad, message", [
    (dict(method="obs"), "sparsity.method"),
    (dict(pattern="4:2"), "N:M"),
    (dict(pattern="2of4"), "N:M"),
    (dict(sparsity=1.0), "between 0 and 1"),
    (dict(pattern="2:4", sparsity=0.7), "contradicts"),
    (dict(sparsity="half"), "sparsity.sparsity"),
    (dict(method="admm", iterations=0), "iterations"),
])
def test_bad_settings_are_named(bad, message):
    with pytest.raises(InvalidConfigError, match=message):
        SparsityConfig(**bad)
    assert SparsityConfig(pattern="1:4").fraction == 0.75
