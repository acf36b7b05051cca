"""The AMX tile kernels (cpu_amx_matmul.cpp) against their definitions.

They run only on CPUs with AMX (and where Linux grants the tile state); elsewhere these tests
skip, and the engine keeps the few-row VNNI kernels. The 4-bit kernel must compute exactly the
numbers of the few-row kernel (same int8 rounding of activations per 64 values), for any number
of rows, so a wrong tile order, nibble, scale or offset shows up as a large error.
"""

import pytest
import torch

from llmquant.kernels import cpu_ext

ext = cpu_ext.fast()
pytestmark = pytest.mark.skipif(ext is None or not ext.amx_ready(), reason="needs a CPU with AMX")


def _pack_int4(u: torch.Tensor) -> torch.Tensor:
    """(N, K) unsigned 4-bit values -> the few-row kernels' layout (N, K/64, 32)."""
    n, k = u.shape
    u = u.reshape(n, k // 64, 2, 32)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).contiguous()


def _blockwise_int8(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) float -> the activations the kernels multiply: int8 per 64 values, dequantized."""
    blocks = x.float().reshape(x.shape[0], -1, 64)
    scale = blocks.abs().amax(-1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(blocks / scale).clamp(-128, 127).double() * scale.double()).reshape(x.shape)


@pytest.mark.parametrize("rows", [2, 5, 16, 17, 40])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_tiles_equal_the_definition_at_any_batch(rows, asym, dtype):
    torch.manual_seed(rows)
    n, k = 96, 384
    u = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale = (torch.rand(n, k // 64) * 0.02 + 0.001).to(torch.bfloat16)
    offset = torch.randint(5, 12, (n, k // 64), dtype=torch.int32) if asym else None
    bias = torch.randn(n).to(dtype)
    x = (torch.randn(rows, k) * 3).to(dtype)
    out = ext.int4_linear_amx(x, *ext.int4_amx_pack(_pack_int4(u), scale, offset), bias)
    off = (offset if asym else torch.full_like(scale, 8, dtype=torch.int32)).double().repeat_interleave(64, 1)
    w = (u.double() - off) * scale.double().repeat_interleave(64, 1)
    ref = _blockwise_int8(x) @ w.t() + bias.double()
    assert out.shape == (rows, n) and out.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16 outputs are rounded to 8 bits
    assert (out.double() - ref).abs().max() < tol * ref.abs().max()
    # The same numbers as the few-row VNNI kernel, row block by row block.
    few = torch.cat([ext.int4_linear(x[i:i + 8], _pack_int4(u), scale, offset, bias) for i in range(0, rows, 8)])
    assert (out.double() - few.double()).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("rows", [1, 3, 16, 33])
def test_int8_head_tiles_are_exact_for_bf16_activations(rows):
    torch.manual_seed(rows)
    n, k = 160, 192
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale, bias = torch.rand(n) * 0.01, torch.randn(n)
    x = torch.randn(rows, 1, k).to(torch.bfloat16)
    out = ext.int8_linear_amx(x, ext.int8_amx_pack(w), scale, bias)
    ref = (x.double() @ w.double().t()) * scale.double() + bias.double()
    assert out.shape == (rows, 1, n) and out.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 1e-5 * ref.abs().max()  # float32 accumulation only


def test_shapes_the_tiles_cannot_hold_are_refused():
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ext.int4_amx_pack(torch.zeros(20, 1, 32, dtype=torch.uint8), torch.ones(20, 1), None)
    with pytest.raises(RuntimeError, match="int8_amx_pack"):
        ext.int8_amx_pack(torch.zeros(16, 48, dtype=torch.int8))
    packed = ext.int8_amx_pack(torch.zeros(16, 64, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="bfloat16"):
        ext.int8_linear_amx(torch.zeros(2, 64), packed, torch.ones(16), None)
