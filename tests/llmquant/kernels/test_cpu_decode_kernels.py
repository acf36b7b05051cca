"""The compiled CPU decode kernels (cpu_decode_*.cpp) against PyTorch / transformers references.

The matmuls are checked exactly against a Python model of what they compute (activations
rounded to int8 per 64-value block or per row, integer dot products, float scales), so a wrong
nibble order, scale index or offset shows up as a large error, not as noise.
"""

import pytest
import torch
import torch.nn.functional as F

from llmquant.kernels import cpu_ext

ext = cpu_ext.fast()
pytestmark = pytest.mark.skipif(ext is None, reason="CPU decode kernels need a C++ toolchain and AVX-512 VNNI")


def _round_activations(x: torch.Tensor, mode: str, static: float = 0.0) -> torch.Tensor:
    """x (M, K) float -> the values the kernel multiplies: int8 grid, dequantized (float64)."""
    xf = x.double()
    if mode == "block":
        blocks = xf.reshape(x.shape[0], -1, 64)
        scale = (blocks.float().abs().amax(-1, keepdim=True) / 127.0).double()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round((blocks.float() / scale.float()).double()).clamp(-128, 127)
        return (q * scale).reshape(x.shape)
    if mode == "row":
        scale = (xf.float().abs().amax(-1, keepdim=True) / 127.0).double()
    else:
        scale = torch.tensor(static).double()
    q = torch.round((xf.float() / scale.float()).double()).clamp(-128, 127)
    return q * scale


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8).reshape(n, k // 64, 2, 32)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).contiguous()


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("asym", [False, True])
def test_int4_linear_equals_its_definition(rows, group, asym):
    torch.manual_seed(0)
    n, k = 200, 384
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    scale = (torch.rand(n, k // group) * 0.02 + 0.001).to(torch.bfloat16)
    zp = torch.randint(-3, 4, (n, k // group), dtype=torch.int32) if asym else None
    bias = torch.randn(n)
    per_block = group // 64
    offset = None if zp is None else (zp + 8).repeat_interleave(per_block, 1).contiguous()
    w = (q.double().reshape(n, -1, group) - (zp.double()[..., None] if asym else 0)) * scale.double()[..., None]
    x = torch.randn(rows, k) * 3
    out = ext.int4_linear(x, _pack_int4(q), scale.repeat_interleave(per_block, 1).contiguous(), offset, bias)
    ref = _round_activations(x, "block") @ w.reshape(n, k).t() + bias.double()
    assert out.shape == (rows, n) and out.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 1e-4 * ref.abs().max()
    # Against the unrounded activations the error is the int8 rounding's: small, not zero.
    exact = x.double() @ w.reshape(n, k).t() + bias.double()
    assert 1e-4 < ((out.double() - exact).norm() / exact.norm()).item() < 1e-2


def test_int4_linear_bf16_and_leading_dims():
    torch.manual_seed(1)
    q = torch.randint(-8, 8, (64, 128), dtype=torch.int8)
    scale = torch.rand(64, 2) * 0.02 + 0.001
    x = torch.randn(1, 1, 128).to(torch.bfloat16)
    out = ext.int4_linear(x, _pack_int4(q), scale, None, None)
    w = (q.double().reshape(64, 2, 64) * scale.double()[..., None]).reshape(64, 128)
    ref = _round_activations(x.reshape(1, 128).float(), "block") @ w.t()
    assert out.shape == (1, 1, 64) and out.dtype == torch.bfloat16
    assert torch.allclose(out.reshape(1, 64).double(), ref, rtol=8e-3, atol=8e-3 * ref.abs().max().item())


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("mode", ["block", "row", "static"])
def test_int8_linear_equals_its_definition(mode, rows):
    torch.manual_seed(2)
    n, k = 136, 256
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) * 0.01 + 1e-4
    wsum = q.to(torch.int32).reshape(n, -1, 64).sum(-1, dtype=torch.int32).contiguous()
    x = torch.randn(rows, k)
    static = 0.02
    code = {"block": ext.PER_BLOCK, "row": ext.PER_ROW, "static": ext.STATIC}[mode]
    out = ext.int8_linear(x, q, scale, wsum, None, code, static)
    ref = _round_activations(x, mode, static) @ (q.double() * scale.double()[:, None]).t()
    assert (out.double() - ref).abs().max() < 1e-5 * ref.abs().max()


def test_int8_linear_float_keeps_activations_exact():
    torch.manual_seed(3)
    q = torch.randint(-127, 128, (300, 192), dtype=torch.int8)
    scale = torch.rand(300) * 0.01
    bias = torch.randn(300)
    x = torch.randn(2, 192)
    out = ext.int8_linear_float(x, q, scale, bias)
    ref = x.double() @ (q.double() * scale.double()[:, None]).t() + bias.double()
    assert (out.double() - ref).abs().max() < 1e-5 * ref.abs().max()


def test_bad_shapes_are_refused():
    q = torch.zeros(8, 96, dtype=torch.int8)  # 96 is not a multiple of 64
    with pytest.raises(RuntimeError, match="multiple of 64|bad"):
        ext.int8_linear_float(torch.zeros(1, 96), q, torch.ones(8), None)
    packed = torch.zeros(8, 2, 32, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="rows"):
        ext.int4_linear(torch.zeros(9, 128), packed, torch.ones(8, 2), None, None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_and_residual_add_match_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(4)
    norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(576) + 0.5)
    x, delta = (torch.randn(3, 1, 576) * 4).to(dtype), torch.randn(3, 1, 576).to(dtype)
    with torch.no_grad():
        ref_sum = x + delta
        ref = norm(ref_sum)
    out_plain = ext.rms_norm(ref_sum.clone(), norm.weight.detach(), 1e-5)
    x_inplace = x.clone()
    out = ext.add_rms_norm_(x_inplace, delta, norm.weight.detach(), 1e-5)
    assert torch.equal(x_inplace, ref_sum)  # the residual stream, updated in place
    for got in (out, out_plain):
        # Same roundings; only the float32 sum of squares' order differs.
        assert (got == ref).float().mean() > 0.99
        assert torch.allclose(got.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_silu_mul_matches_torch():
    torch.manual_seed(5)
    gate_up = (torch.randn(2, 1, 2 * 200) * 5).to(torch.bfloat16)  # 200: vector body and a scalar tail
    g, u = gate_up.chunk(2, dim=-1)
    ref = F.silu(g) * u
    out = ext.silu_mul(gate_up.contiguous())
    assert out.shape == ref.shape
    assert (out == ref).float().mean() > 0.99
    assert torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_rope_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(6)
    heads, kv_heads, d, rows = 4, 2, 64, 3
    fused = torch.randn(rows, 1, (heads + 2 * kv_heads) * d)
    angle = torch.rand(rows, 1, d // 2) * 10
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    q = fused[..., :heads * d].view(rows, 1, heads, d).transpose(1, 2)
    k = fused[..., heads * d:(heads + kv_heads) * d].view(rows, 1, kv_heads, d).transpose(1, 2)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    v_before = fused[..., (heads + kv_heads) * d:].clone()
    out = fused.clone()
    ext.rope_(out, cos.contiguous(), sin.contiguous(), heads + kv_heads, d)
    assert torch.allclose(out[..., :heads * d].view(rows, 1, heads, d).transpose(1, 2), q_ref, atol=1e-5)
    assert torch.allclose(out[..., heads * d:(heads + kv_heads) * d].view(rows, 1, kv_heads, d).transpose(1, 2),
                          k_ref, atol=1e-5)
    assert torch.equal(out[..., (heads + kv_heads) * d:], v_before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 48, 40])  # unrolled vector path, runtime-sized vector path, scalar path
@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (8, 1)])  # query heads per kv head: 3, and 8 (two chunks)
def test_decode_attention_matches_sdpa(dtype, head_dim, heads, kv_heads):
    torch.manual_seed(7)
    batch, length, capacity = 2, 37, 64
    q = torch.randn(batch, heads, head_dim).to(dtype)
    kbuf = torch.randn(batch, kv_heads, capacity, head_dim).to(dtype)
    vbuf = torch.randn(batch, kv_heads, capacity, head_dim).to(dtype)
    keys, values = kbuf[:, :, :length], vbuf[:, :, :length]  # views with the buffer's strides
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :5] = 0  # row 0 is left-padded
    out = ext.decode_attention(q, keys, values, mask)
    ref = F.scaled_dot_product_attention(q.float()[:, :, None], keys.float(), values.float(),
                                         attn_mask=mask.bool()[:, None, None, :], enable_gqa=True)[:, :, 0]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out.float(), ref, atol=tol, rtol=tol)
    unmasked = ext.decode_attention(q, keys, values, None)
    assert not torch.allclose(unmasked[0].float(), ref[0], atol=1e-3)  # the mask did something
    assert torch.allclose(unmasked[1].float(), ref[1], atol=tol, rtol=tol)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(cpu_ext.ENV_SWITCH, "0")
    cpu_ext.load.cache_clear()
    try:
        assert cpu_ext.load() is None and cpu_ext.fast() is None
    finally:
        monkeypatch.delenv(cpu_ext.ENV_SWITCH)
        cpu_ext.load.cache_clear()
    assert cpu_ext.fast() is not None


def test_the_installed_ninja_is_found_without_an_activated_environment(monkeypatch):
    import os
    import shutil

    import ninja

    monkeypatch.setenv("PATH", "/nonexistent")
    assert shutil.which("ninja") is None
    cpu_ext._ninja_on_path()
    assert shutil.which("ninja") is not None and os.environ["PATH"].endswith(ninja.BIN_DIR)


def test_a_stale_build_lock_does_not_hang_the_next_start():
    # A build killed mid-way leaves torch's lock file behind, and torch waits on it forever.
    # A fresh process (load() is cached per process) must remove a lock older than a build takes.
    # The build itself exists already (this module loaded it), so the fresh process only loads it.
    import os
    import subprocess
    import sys
    import time

    code = ("import logging, sys; logging.basicConfig(level=logging.WARNING)\n"
            "from llmquant.kernels import cpu_ext\n"
            "name = f'llmquant_cpu_decode_{cpu_ext._build_digest()}'\n"
            "from torch.utils.cpp_extension import _get_build_directory\n"
            "print(_get_build_directory(name, False))\n")
    folder = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()[-1]
    lock = os.path.join(folder, "lock")
    open(lock, "w").close()
    old = time.time() - 2 * cpu_ext.STALE_LOCK_SECONDS
    os.utime(lock, (old, old))
    out = subprocess.run([sys.executable, "-c", "from llmquant.kernels import cpu_ext; "
                          "print('LOADED', cpu_ext.load() is not None)"],
                         capture_output=True, text=True, timeout=300)
    assert "LOADED True" in out.stdout, out.stderr[-2000:]
    assert "stale build lock" in out.stderr
