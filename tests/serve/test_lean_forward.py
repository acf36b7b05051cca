"""The lean forward: same logits as transformers' forward (padded prefill, decode steps, fused
quantized projections), used by the engine for Llama-shaped models and refused for others."""

import pytest
import torch

from llmquant.serve import kv_cache
from llmquant.serve.forward.fuse import fuse_linears
from llmquant.serve.forward.lean import LeanForward
from llmquant.serve.forward.probe import NOISE_MARGIN, PROBE_MAX_KL, noise_floor, probe_ids, probe_kl
from llmquant.serve.forward.select import select_forward
from llmquant.serve.forward.transformers_forward import TransformersForward, cache_kwarg


def _hf_step(model, ids, positions, mask, cache):
    return model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                 **{cache_kwarg(model): cache}).logits.float()


def _compare_padded_batch(model, lean, atol):
    """Two rows, one left-padded, then three decode steps: every real position's logits agree."""
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9], [9, 10, 11, 12, 13, 14, 15, 16]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    ours_cache, ref_cache = kv_cache.new_cache(), kv_cache.new_cache()
    worst = 0.0
    with torch.inference_mode():
        ours = lean(ids, positions, mask, ours_cache, True)
        ref = _hf_step(model, ids, positions, mask, ref_cache)
        worst = max((ours - ref)[0, 3:].abs().max().item(), (ours - ref)[1].abs().max().item())
        for step in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
            nxt = torch.tensor([[20 + step], [30 + step]])
            ours = lean(nxt, positions, mask, ours_cache, False)
            ref = _hf_step(model, nxt, positions, mask, ref_cache)
            assert ours.shape == ref.shape == (2, 1, model.config.vocab_size)
            worst = max(worst, (ours - ref).abs().max().item())
    assert worst < atol, worst
    return worst


def test_same_logits_as_transformers_float32(tiny_model_dir):
    from llmquant import load_model

    model = load_model(tiny_model_dir, dtype="float32").model
    assert LeanForward.supports(model)
    _compare_padded_batch(model, LeanForward(model, 512), atol=1e-4)


@pytest.mark.parametrize("scheme", ["W4A16", "W8A8", "W8A16"])
def test_fused_quantized_projections_equal_the_separate_ones(tiny_model_dir, scheme):
    from llmquant import quantize

    model = quantize(tiny_model_dir, scheme=scheme, group_size=32 if scheme == "W4A16" else None,
                     num_samples=4, seq_len=64, verify=False, progress=False, dtype="float32").model
    attn = model.model.layers[0].self_attn
    parts = [attn.q_proj, attn.k_proj, attn.v_proj]
    fused = fuse_linears(parts)
    assert type(fused).__name__ == "QuantizedLinear"  # one matmul, not three
    x = torch.randn(3, 5, parts[0].in_features)
    with torch.inference_mode():
        expected = torch.cat([p(x) for p in parts], dim=-1)
        assert torch.allclose(fused(x), expected, atol=1e-5, rtol=1e-5)
    _compare_padded_batch(model, LeanForward(model, 512), atol=1e-3)


def test_engine_uses_it_and_refuses_other_shapes(tiny_loaded, tiny_model_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmquant.serve.engine import Engine

    engine = Engine(tiny_loaded, max_batch_size=2)
    try:
        assert isinstance(engine.forward, LeanForward)
    finally:
        engine.shutdown()
    plain = Engine(tiny_loaded, max_batch_size=2, lean_forward=False)
    try:
        assert type(plain.forward) is TransformersForward
    finally:
        plain.shutdown()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64))
    assert not LeanForward.supports(gpt2)
    assert type(select_forward(gpt2, 64, [5, 6, 7])) is TransformersForward


def test_a_model_that_disagrees_is_refused(tiny_model_dir, tiny_loaded):
    """The probe tells a lean forward that computes something else (here: RMSNorm epsilon) apart."""
    from llmquant import load_model

    model = load_model(tiny_model_dir, dtype="float32").model
    for norm in [model.model.norm] + [n for layer in model.model.layers
                                      for n in (layer.input_layernorm, layer.post_attention_layernorm)]:
        norm.variance_epsilon = 1.0  # large enough to change every output
    lean = LeanForward(model, 512)
    probe = probe_ids(tiny_loaded.tokenizer)
    assert probe_kl(lean, model, probe) < 1e-6
    for layer in lean.layers:
        layer.eps1 = layer.eps2 = 1e-6
    lean.eps = 1e-6
    wrong = probe_kl(lean, model, probe)
    assert wrong > PROBE_MAX_KL
    # The bound can rise with the model's own sensitivity to rounding, but not to this.
    floor = noise_floor(model, probe)
    assert wrong > NOISE_MARGIN * floor


def test_noise_floor_of_an_ordinary_model_leaves_the_bound_alone(tiny_model_dir, tiny_loaded):
    """A one-bf16-step perturbation moves a bf16 model's outputs, but far less than the bound."""
    from llmquant import load_model

    model = load_model(tiny_model_dir, dtype="bfloat16").model
    floor = noise_floor(model, probe_ids(tiny_loaded.tokenizer))
    assert 0 < floor < PROBE_MAX_KL / NOISE_MARGIN / 10, floor
