"""The CPU lean forward (compiled kernels; the batch-1 decode loop in C++) against transformers."""

import pytest
import torch

from llmquant.kernels import cpu_ext
from llmquant.serve import kv_cache
from llmquant.serve.forward import cpu_backend
from llmquant.serve.forward.cpu_backend import CpuSteps
from llmquant.serve.forward.lean import LeanForward
from llmquant.serve.forward.transformers_forward import cache_kwarg

pytestmark = pytest.mark.skipif(cpu_ext.fast() is None, reason="needs the compiled CPU decode kernels (AVX-512 VNNI)")


class _CountingStack:
    """Delegates to the C++ stack and counts its steps (proves the C++ path ran)."""

    def __init__(self, stack):
        self.stack, self.steps = stack, 0

    def step(self, *args):
        self.steps += 1
        return self.stack.step(*args)


def _hf(model, ids, positions, mask, cache):
    return model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True,
                 **{cache_kwarg(model): cache}).logits.float()


def _kl(ref_logits, ours_logits) -> float:
    ref, ours = ref_logits.log_softmax(-1), ours_logits.log_softmax(-1)
    return (ref.exp() * (ref - ours)).sum(-1).max().item()


def _batch_one_decode(model, lean, steps=4):
    """Prefill 8 tokens, then `steps` single-token steps; worst KL and logit error of each phase."""
    ids = torch.tensor([[3, 17, 250, 9, 44, 101, 7, 300]])
    positions = torch.arange(8)[None]
    ours_cache, ref_cache = kv_cache.new_cache(), kv_cache.new_cache()
    kls, errors = [], []
    with torch.inference_mode():
        ours, ref = lean(ids, positions, None, ours_cache, True), _hf(model, ids, positions, None, ref_cache)
        kls.append(_kl(ref, ours))
        for step in range(steps):
            nxt, positions = torch.tensor([[40 + step]]), positions[:, -1:] + 1
            ours, ref = lean(nxt, positions, None, ours_cache, False), _hf(model, nxt, positions, None, ref_cache)
            assert ours.shape == ref.shape == (1, 1, model.config.vocab_size)
            kls.append(_kl(ref, ours))
            errors.append(((ours - ref).abs().max() / ref.abs().max()).item())
    assert kv_cache.cache_length(ours_cache) == 8 + steps
    return max(kls), max(errors)


def _model(tiny_model_dir, scheme):
    from llmquant import load_model, quantize

    if scheme is None:
        return load_model(tiny_model_dir, dtype="bfloat16").model
    return quantize(tiny_model_dir, scheme=scheme, group_size=64 if scheme == "W4A16" else None, num_samples=4,
                    seq_len=64, verify=False, progress=False, dtype="bfloat16").model


@pytest.mark.parametrize("scheme", [None, "W4A16", "W8A8", "W8A16"])
def test_batch_one_decode_runs_in_cpp_and_agrees_with_transformers(tiny_model_dir, scheme):
    model = _model(tiny_model_dir, scheme)
    lean = LeanForward(model, 512, steps=CpuSteps)
    assert lean.steps.stack is not None and lean.steps.int8_head is not None
    lean.steps.stack = counting = _CountingStack(lean.steps.stack)
    kl, error = _batch_one_decode(model, lean)
    assert counting.steps == 4
    # Differences come from the INT8 lm_head copy and bf16 rounding order: measured KL 3e-6 to
    # 7e-6 nats (a layer norm with the wrong epsilon: 0.06, below).
    assert kl < 1e-4, kl
    assert error < 0.05, error


def test_a_wrong_layer_is_seen(tiny_model_dir):
    """The comparison above can fail: a stack built on a layer norm of the wrong epsilon is off."""
    model = _model(tiny_model_dir, None)
    lean = LeanForward(model, 512, steps=CpuSteps)
    lean.layers[0].eps1 = 1.0
    lean.use_steps(CpuSteps)  # the C++ stack is built from the layers as they are now
    lean.steps.stack = counting = _CountingStack(lean.steps.stack)
    kl, _ = _batch_one_decode(model, lean, steps=2)
    assert counting.steps == 2
    assert kl > 1e-2, kl


def test_padded_batches_decode_in_the_stack_and_agree(tiny_model_dir):
    """A left-padded batch of two decodes through the C++ stack (all rows in one step; on an AMX
    CPU its 4-bit projections run on tiles) and agrees with transformers."""
    model = _model(tiny_model_dir, "W4A16")
    lean = LeanForward(model, 512, steps=CpuSteps)
    lean.steps.stack = counting = _CountingStack(lean.steps.stack)
    ids = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9], [9, 10, 11, 12, 13, 14, 15, 16]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    ours_cache, ref_cache = kv_cache.new_cache(), kv_cache.new_cache()
    with torch.inference_mode():
        ours, ref = lean(ids, positions, mask, ours_cache, True), _hf(model, ids, positions, mask, ref_cache)
        kls = [_kl(ref[1], ours[1]), _kl(ref[0, 3:], ours[0, 3:])]
        for step in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
            nxt = torch.tensor([[20 + step], [30 + step]])
            kls.append(_kl(_hf(model, nxt, positions, mask, ref_cache), lean(nxt, positions, mask, ours_cache, False)))
    assert counting.steps == 3
    assert max(kls) < 1e-4, kls  # measured 2e-6 to 3e-6


def test_engine_builds_it_on_cpu(tiny_model_dir):
    from llmquant import load_model
    from llmquant.serve.engine import Engine

    engine = Engine(load_model(tiny_model_dir, dtype="bfloat16"), max_batch_size=2)
    try:
        assert isinstance(engine.forward, LeanForward) and type(engine.forward.steps) is CpuSteps
    finally:
        engine.shutdown()


def test_float16_models_keep_the_torch_path(tiny_model_dir):
    """The compiled kernels have no float16 paths: such a model is not offered to them."""
    from llmquant import load_model

    assert cpu_backend.available(load_model(tiny_model_dir, dtype="bfloat16").model)
    assert not cpu_backend.available(load_model(tiny_model_dir, dtype="float16").model)
