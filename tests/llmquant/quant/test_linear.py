"""QuantizedLinear: its kernels compute the reference, its buffers are the checkpoint format."""

import pytest
import torch
from torch import nn

from llmquant.config.args import QuantArgs
from llmquant.quant.linear import QuantizedLinear
from llmquant.config.presets import PRESETS

SCHEMES = {name: s if s.weights.strategy != "group" else
           s.replace(weights=QuantArgs(**{**s.weights.to_dict(), "group_size": 64})) for name, s in PRESETS.items()}

EXPECTED_TENSORS = {  # compressed-tensors names and dtypes (vLLM's loaders read these)
    "W8A16": {"weight_packed": torch.int32, "weight_shape": torch.int64, "weight_scale": torch.bfloat16},
    "W4A16": {"weight_packed": torch.int32, "weight_shape": torch.int64, "weight_scale": torch.bfloat16},
    "W4A16_ASYM": {"weight_packed": torch.int32, "weight_shape": torch.int64, "weight_scale": torch.bfloat16,
                   "weight_zero_point": torch.int32},
    "W8A8": {"weight": torch.int8, "weight_scale": torch.float32},
    "FP8": {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32, "input_scale": torch.float32},
    "FP8_DYNAMIC": {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32},
    "FP8_W": {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32},
}


def _layer(name, bias=True, out_f=192, in_f=576, device="cpu"):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias)
    scheme = SCHEMES[name]
    scale_dtype = torch.bfloat16 if scheme.format == "pack-quantized" else torch.float32
    return lin, QuantizedLinear.from_float(lin, scheme, scale_dtype=scale_dtype, input_scale=0.02).to(device)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_state_dict_is_the_compressed_tensors_layout(name):
    _, q = _layer(name, bias=False)
    sd = q.state_dict()
    assert {k: v.dtype for k, v in sd.items()} == EXPECTED_TENSORS[name]
    if "weight_packed" in sd:
        bits = SCHEMES[name].weights.num_bits
        assert sd["weight_packed"].shape == (192, 576 * bits // 32)
        assert sd["weight_shape"].tolist() == [192, 576]
    if name == "W4A16_ASYM":
        assert sd["weight_zero_point"].shape == (192 // 8, 576 // 64)  # packed along outputs


@pytest.mark.parametrize("rows", [1, 3, 7, 64, 300])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_forward_matches_reference(device, name, rows):
    from llmquant.kernels.registry import select_kernel

    _, q = _layer(name, device=device)
    x = torch.randn(rows, 576, device=device)
    out = q(x)
    assert out.shape == (rows, 192)
    kernel = select_kernel(q, x).name
    if kernel in ("int4pack_cpu", "int8pack_cpu"):
        # These kernels take bf16 activations and return bf16: compare at bf16 precision.
        ref = q.reference_forward(x.to(torch.bfloat16).float())
        tol = 8e-3
    elif kernel in ("int4_dot_cpu", "int8_dot_cpu") and q.scheme.input_activations is None:
        # Weight-only schemes: these kernels round activations to int8 per 64 values.
        ref = q.reference_forward(x)
        tol = 2e-2
    elif kernel == "int8_dot_cpu":
        # W8A8: the scheme's own int8 activations, integer dot products; only float order differs.
        ref = q.reference_forward(x)
        tol = 1e-4
    else:
        ref = q.reference_forward(x)
        tol = 1e-4
    assert torch.allclose(out, ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("name", ["W8A16", "W4A16", "W8A8", "FP8_DYNAMIC"])
def test_quantized_output_is_close_to_float_output(name):
    lin, q = _layer(name)
    x = torch.randn(16, 576)
    cos = torch.nn.functional.cosine_similarity(q(x).double().flatten(), lin(x).detach().double().flatten(), dim=0)
    assert cos > (0.995 if name != "W4A16" else 0.98)


def test_fast_cpu_kernels_are_used_where_they_apply():
    from llmquant.kernels import cpu_ext

    one_row = "int4_dot_cpu" if cpu_ext.fast() is not None else "int4pack_cpu"
    _, q4 = _layer("W4A16")
    q4(torch.randn(1, 576))
    q4(torch.randn(16, 576))
    assert {k[0] for k, v in q4.kernel_cache.items() if v} == {one_row, "int4pack_cpu"}
    _, q8 = _layer("W8A16")
    q8(torch.randn(1, 576))
    q8(torch.randn(16, 576))
    assert {k[0] for k, v in q8.kernel_cache.items() if v} == {one_row.replace("4", "8"), "int8pack_cpu"}


@pytest.mark.parametrize("name", ["W4A16", "W4A16_ASYM"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_dequantization_is_bit_identical(name, dtype):
    """Many rows (a prompt): the compiled dequantization gives exactly the weights of the
    PyTorch-op path, so prefill logits do not change with it."""
    from llmquant.kernels import cpu_ext
    from llmquant.kernels.registry import DequantMatmul, select_kernel

    if cpu_ext.fast() is None:
        pytest.skip("needs the compiled CPU kernels")
    _, q = _layer(name)
    x = torch.randn(300, 576).to(dtype)
    kernel = select_kernel(q, x)
    assert kernel.name == "int4_dequant_cpu"
    assert torch.equal(kernel(x), DequantMatmul(q, x.device, dtype)(x))


def test_model_dtype_cast_keeps_quantized_storage():
    _, q = _layer("FP8")
    q = q.to(torch.bfloat16)
    assert q.weight.dtype == torch.float8_e4m3fn
    assert q.weight_scale.dtype == torch.float32 and q.input_scale.dtype == torch.float32
    assert q.bias.dtype == torch.bfloat16
    y = q(torch.randn(3, 576, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    _, q = _layer("W4A16")
    x = torch.randn(5, 576)
    out = q(x.to(dtype)).float()
    ref = q.reference_forward(x)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999
