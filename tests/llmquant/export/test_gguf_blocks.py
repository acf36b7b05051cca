"""GGUF block types: our bytes are llama.cpp's layout, our scales beat its reference rounding, GPTQ
onto a type's grid beats rounding, and the file-type mixtures are llama.cpp's."""

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
import gguf.quants  # noqa: E402

from llmquant.export.gguf.blocks import dequantize, pack, unpack  # noqa: E402
from llmquant.export.gguf.ggml_types import BLOCK_TYPES  # noqa: E402
from llmquant.export.gguf.quantize_tensor import gptq_to_type, round_to_type  # noqa: E402
from llmquant.export.gguf.type_plan import TensorSlot, plan_types  # noqa: E402
from llmquant.quant.algorithms.gptq import accumulate_hessian  # noqa: E402
from llmquant.quant.algorithms.gptq_scales import output_error  # noqa: E402

TYPES = sorted(BLOCK_TYPES)


def _weight(rows=16, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[1, 7] = 0.8  # an outlier
    w[2, :256] = w[2, :256].abs()  # a block with no negative value (K-quant mins pinned at 0)
    w[3, 256:] = 0.0  # an all-zero block
    return w


@pytest.mark.parametrize("name", TYPES)
def test_packed_blocks_are_llama_cpp_layout(name):
    t = BLOCK_TYPES[name]
    w = _weight()
    typed = round_to_type(w, t)
    raw = pack(typed.codes, typed.params)
    assert raw.dtype == np.uint8 and raw.shape == (16, 512 // t.block * t.bytes_per_block())
    # gguf-py's dequantization is a port of llama.cpp's dequantize_row_*: the same numbers, exactly.
    theirs = torch.from_numpy(gguf.quants.dequantize(raw, t.gguf_type()).astype(np.float32)).reshape(16, 512)
    assert torch.equal(theirs, typed.dequantized)
    codes, params = unpack(raw, t, 512)
    assert torch.equal(codes, typed.codes)
    assert torch.equal(dequantize(codes, params), typed.dequantized)
    assert t.umin <= codes.min() and codes.max() <= t.umax
    assert torch.equal(typed.dequantized[3, 256:], torch.zeros(256))  # zeros stay exact


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_scale_search_beats_llama_cpp_reference_rounding(name):
    t = BLOCK_TYPES[name]
    w = _weight(rows=64, seed=1)
    ours = round_to_type(w, t).dequantized
    ref = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), t.gguf_type()), t.gguf_type()))
    ours_err, ref_err = (w - ours).pow(2).sum(), (w - ref.reshape(w.shape)).pow(2).sum()
    # At 8 bits the rounding itself dominates: little is left for a better scale to win.
    assert ours_err < (0.99 if t.bits == 8 else 0.95) * ref_err, (float(ours_err), float(ref_err))


def _correlated_inputs(cols=512, n=4096, seed=2):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    return (torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 2 * mix)) * (torch.rand(cols, generator=g) * 3 + 0.1)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K"])
def test_gptq_onto_a_type_beats_rounding_on_the_outputs(name):
    t = BLOCK_TYPES[name]
    w = _weight(rows=64, seed=3)
    hessian, _ = accumulate_hessian(None, 0, _correlated_inputs())
    weighted = round_to_type(w, t, torch.diag(hessian))  # importance-weighted search, as an imatrix
    plain = round_to_type(w, t)
    gptq = gptq_to_type(w, hessian, t)
    errors = [float(output_error(w, x.dequantized, hessian).sum()) for x in (plain, weighted, gptq)]
    assert errors[1] < errors[0]
    assert errors[2] < 0.8 * errors[1], errors
    # GPTQ's codes are still on the type's grid: they pack and read back as themselves.
    codes, _ = unpack(pack(gptq.codes, gptq.params), t, w.shape[1])
    assert torch.equal(codes, gptq.codes)


def test_rows_must_fit_the_block():
    with pytest.raises(ValueError, match="multiple of 256"):
        round_to_type(torch.randn(4, 576), BLOCK_TYPES["Q4_K"])


def _demo_like_slots(layers=30, hidden=576, inter=1536):
    slots = [TensorSlot("token_embd.weight", (49152, hidden))]
    for i in range(layers):
        for part, shape in [("attn_q", (hidden, hidden)), ("attn_k", (192, hidden)), ("attn_v", (192, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (inter, hidden)),
                            ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))]:
            slots.append(TensorSlot(f"blk.{i}.{part}.weight", shape))
        slots.append(TensorSlot(f"blk.{i}.attn_norm.weight", (hidden,)))
    return slots


def test_q4_k_m_mixture_follows_llama_cpp():
    """SmolLM2-135M's shapes: rows of 576 cannot hold 256-blocks, so llama.cpp's Q4_K_M falls back
    to Q5_0 (from Q4_K) and Q8_0 (from Q6_K) there; FFN down (rows of 1536) keeps Q4_K / Q6_K."""
    plan = plan_types(_demo_like_slots(), "Q4_K_M", 30, calibrated=True)
    assert plan["token_embd.weight"] == "Q8_0"  # tied: the output's type, which falls back to Q8_0
    assert plan["blk.5.attn_q.weight"] == "Q5_0"
    assert plan["blk.0.attn_v.weight"] == "Q8_0" and plan["blk.4.attn_v.weight"] == "Q5_0"
    assert plan["blk.0.attn_norm.weight"] == "F32"
    more = [i for i in range(30) if plan[f"blk.{i}.ffn_down.weight"] == "Q6_K"]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert all(plan[f"blk.{i}.ffn_down.weight"] == "Q4_K" for i in range(30) if i not in more)


def test_q4_0_mixture_follows_llama_cpp():
    plan = plan_types(_demo_like_slots(), "Q4_0", 30, calibrated=True)
    assert plan["token_embd.weight"] == "Q8_0"
    assert [i for i in range(30) if plan[f"blk.{i}.ffn_down.weight"] == "Q4_1"] == [0, 1, 2]
    uncalibrated = plan_types(_demo_like_slots(), "Q4_0", 30, calibrated=False)
    assert {uncalibrated[f"blk.{i}.ffn_down.weight"] for i in range(30)} == {"Q4_0"}


def test_activation_noise_is_llama_cpps_8_bit_rounding_of_inputs():
    """The variance llama.cpp's Q8_0 rounding of activations adds, per input column, joins the
    Hessian of 8-bit weight types only."""
    from llmquant.export.gguf.calibrated import ActivationNoise, InputStatistics

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 50, 64, generator=g) * torch.linspace(0.1, 4, 64)
    noise = ActivationNoise()
    for part in x.split(1):  # batches arrive one at a time: the running mean is exact
        noise.add(part)
    blocks = x.reshape(150, 2, 32).abs().amax(-1)  # (tokens, blocks)
    expected = 2 * ((blocks / 127) ** 2 / 12).mean(0).repeat_interleave(32)
    assert torch.allclose(noise.diagonal(), expected, rtol=1e-5)
    # The measured noise matches rounding blocks of 32 to 8 bits, as llama.cpp's quantize_row_q8_0 does.
    flat = x.reshape(-1, 2, 32)
    d = flat.abs().amax(-1, keepdim=True) / 127
    rounded = torch.round(flat / d) * d
    measured = 2 * (rounded - flat).pow(2).mean(0).reshape(64)
    assert torch.allclose(measured.mean(), expected.mean(), rtol=0.15)

    inputs = InputStatistics()
    inputs.add(x)
    assert torch.equal(inputs.hessian_for(BLOCK_TYPES["Q4_0"]), inputs.hessian)
    added = inputs.hessian_for(BLOCK_TYPES["Q8_0"]) - inputs.hessian
    # (H + N) - H in float32: N's digits below H's last bit are lost, hence the tolerance.
    assert torch.allclose(torch.diag(added), expected, rtol=1e-3, atol=1e-6 * float(torch.diag(inputs.hessian).max()))
    assert torch.count_nonzero(added - torch.diag(torch.diag(added))) == 0
