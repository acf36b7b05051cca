"""Bytes of llama.cpp's quantized blocks: packing our codes and scales, and reading them back.

`pack(codes, params)` turns unsigned codes (rows, cols) and their `BlockParams` into the
(rows, row_bytes) uint8 array GGUFWriter stores for that type; `unpack(raw, type, cols)` is its
exact inverse, used to check a written file code for code. The layouts are llama.cpp's
(ggml-common.h, and its dequantize_row_* functions in ggml-quants.c):

- Q4_0 / Q4_1: [d f16][m f16 (Q4_1)][16 bytes: code j in the low nibble of byte j, code j+16 in
  the high nibble].
- Q5_0 / Q5_1: as Q4_*, with the codes' fifth bits in a little-endian uint32 after the scales
  (bit j for code j).
- Q8_0: [d f16][32 int8 = code - 128].
- Q4_K: [d][dmin][12 bytes: eight 6-bit scales and mins][128 bytes: for each 64 codes, code l in
  the low nibble and code 32 + l in the high nibble of byte l].
- Q5_K: [d][dmin][12 bytes scales][32 bytes high bits: bit 2c / 2c+1 of byte l for the two
  halves of chunk c][128 bytes as Q4_K].
- Q6_K: [128 bytes low nibbles][64 bytes high 2-bit pairs][16 int8 scales][d f16].
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from llmquant.export.gguf.ggml_types import AFFINE, K_AFFINE, SYM, BlockParams, GGMLType


def _f16_bytes(x: Tensor) -> np.ndarray:
    """(rows, blocks) float -> (rows, blocks, 2) uint8, little-endian f16."""
    return x.to(torch.float16).numpy().astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def _f16_from(b: np.ndarray) -> Tensor:
    """(rows, blocks, 2) uint8 -> (rows, blocks) float32."""
    return torch.from_numpy(np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32))


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 0x0F) | ((hi & 0x0F) << 4)


def _pack_scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block -> 12 bytes (inverse of llama.cpp's get_scale_min_k4)."""
    out = np.zeros((*sc.shape[:-1], 12), dtype=np.uint8)
    out[..., 0:4] = sc[..., 0:4] | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = mn[..., 0:4] | ((mn[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 0x0F) | ((mn[..., 4:8] & 0x0F) << 4)
    return out


def _unpack_scales_k4(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sc = np.empty((*b.shape[:-1], 8), dtype=np.uint8)
    mn = np.empty_like(sc)
    sc[..., 0:4] = b[..., 0:4] & 63
    mn[..., 0:4] = b[..., 4:8] & 63
    sc[..., 4:8] = (b[..., 8:12] & 0x0F) | ((b[..., 0:4] >> 6) << 4)
    mn[..., 4:8] = (b[..., 8:12] >> 4) | ((b[..., 4:8] >> 6) << 4)
    return sc, mn


def pack(codes: Tensor, params: BlockParams) -> np.ndarray:
    """codes (rows, cols) integers in [0, umax] -> (rows, blocks * bytes_per_block) uint8."""
    t = params.type
    rows, cols = codes.shape
    if cols % t.block:
        raise ValueError(f"{t.name} needs rows whose length is a multiple of {t.block}, got {cols}")
    u = codes.to(torch.uint8).numpy().reshape(rows, cols // t.block, t.block)
    parts: list[np.ndarray]
    if t.kind in (SYM, AFFINE):
        head = [_f16_bytes(params.d)] + ([_f16_bytes(params.m)] if t.kind == AFFINE else [])
        if t.bits == 8:
            parts = head + [(u.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
        else:
            body = [_nibbles(u[..., :16], u[..., 16:])]
            if t.bits == 5:
                high = ((u >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
                body = [high.sum(-1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(*u.shape[:2], 4)] + body
            parts = head + body
    elif t.kind == K_AFFINE:
        sc = params.sc.to(torch.uint8).numpy()
        mn = params.mins.to(torch.uint8).numpy()
        chunks = u.reshape(rows, -1, 4, 2, 32)  # (rows, blocks, chunk of 64, half, l)
        low = _nibbles(chunks[..., 0, :], chunks[..., 1, :]).reshape(rows, -1, 128)
        parts = [_f16_bytes(params.d), _f16_bytes(params.dmin), _pack_scales_k4(sc, mn)]
        if t.bits == 5:
            bits = (chunks >> 4) & 1  # (rows, blocks, 4, 2, 32)
            shift = (2 * np.arange(4).reshape(4, 1, 1) + np.arange(2).reshape(1, 2, 1)).astype(np.uint8)
            parts.append((bits << shift).sum(axis=(2, 3), dtype=np.uint8))  # (rows, blocks, 32)
        parts.append(low)
    else:  # K_SYM (Q6_K)
        halves = u.reshape(rows, -1, 2, 4, 32)  # (rows, blocks, half of 128, quarter, l)
        ql = np.concatenate([_nibbles(halves[..., 0, :], halves[..., 2, :]),
                             _nibbles(halves[..., 1, :], halves[..., 3, :])], axis=-1)  # (rows, blocks, 2, 64)
        qh = ((halves[..., 0, :] >> 4) | ((halves[..., 1, :] >> 4) << 2) | ((halves[..., 2, :] >> 4) << 4)
              | ((halves[..., 3, :] >> 4) << 6))  # (rows, blocks, 2, 32)
        sc = params.sc.to(torch.int8).numpy().view(np.uint8)
        parts = [ql.reshape(rows, -1, 128), qh.reshape(rows, -1, 64), sc, _f16_bytes(params.d)]
    block = np.concatenate([p.reshape(rows, u.shape[1], -1) for p in parts], axis=-1)
    assert block.shape[-1] == t.bytes_per_block(), (t.name, block.shape)
    return np.ascontiguousarray(block.reshape(rows, -1))


def unpack(raw: np.ndarray, t: GGMLType, cols: int) -> tuple[Tensor, BlockParams]:
    """(rows, row_bytes) uint8 -> (codes (rows, cols) uint8 tensor, BlockParams): pack's inverse."""
    rows = raw.shape[0]
    b = raw.reshape(rows, cols // t.block, t.bytes_per_block())
    if t.kind in (SYM, AFFINE):
        d = _f16_from(b[..., 0:2])
        m = _f16_from(b[..., 2:4]) if t.kind == AFFINE else None
        at = 4 if t.kind == AFFINE else 2
        if t.bits == 8:
            u = (b[..., at:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        else:
            high = np.zeros((*b.shape[:2], 32), dtype=np.uint8)
            if t.bits == 5:
                word = np.ascontiguousarray(b[..., at:at + 4]).view("<u4")  # (rows, blocks, 1)
                high = (((word >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)
                at += 4
            qs = b[..., at:at + 16]
            u = np.concatenate([qs & 0x0F, qs >> 4], axis=-1) | high
        params = BlockParams(t, d=d, m=m)
    elif t.kind == K_AFFINE:
        d, dmin = _f16_from(b[..., 0:2]), _f16_from(b[..., 2:4])
        sc, mn = _unpack_scales_k4(b[..., 4:16])
        at = 16
        high = np.zeros((*b.shape[:2], 4, 2, 32), dtype=np.uint8)
        if t.bits == 5:
            qh = b[..., at:at + 32][:, :, None, None, :]
            shift = (2 * np.arange(4).reshape(4, 1, 1) + np.arange(2).reshape(1, 2, 1)).astype(np.uint8)
            high = ((qh >> shift) & 1) << 4
            at += 32
        qs = b[..., at:at + 128].reshape(rows, -1, 4, 32)
        u = np.stack([qs & 0x0F, qs >> 4], axis=3) | high  # (rows, blocks, 4, 2, 32)
        params = BlockParams(t, d=d, dmin=dmin, sc=torch.from_numpy(sc.astype(np.float32)),
                             mins=torch.from_numpy(mn.astype(np.float32)))
    else:  # K_SYM
        ql = b[..., 0:128].reshape(rows, -1, 2, 64)
        qh = b[..., 128:192].reshape(rows, -1, 2, 32)
        sc = b[..., 192:208].view(np.int8)
        d = _f16_from(b[..., 208:210])
        lo = [ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4]
        u = np.stack([lo[k] | (((qh >> (2 * k)) & 3) << 4) for k in range(4)], axis=3)  # (rows, blocks, 2, 4, 32)
        params = BlockParams(t, d=d, sc=torch.from_numpy(sc.astype(np.float32)))
    codes = torch.from_numpy(np.ascontiguousarray(u).reshape(rows, cols).astype(np.uint8))
    return codes, params


def dequantize(codes: Tensor, params: BlockParams) -> Tensor:
    """(rows, cols) float32 weights: scale * u + offset per group."""
    t = params.type
    scale, offset = params.effective()
    rows, cols = codes.shape
    u = codes.float().reshape(rows, -1, t.group)
    return (u * scale.unsqueeze(-1) + offset.unsqueeze(-1)).reshape(rows, cols)
