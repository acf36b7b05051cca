"""The llama.cpp block types we write, and what their stored numbers mean.

Every type stores a row of weights as blocks along the input dimension. Within a block, each
group of `group` weights shares one effective scale and offset, and a weight is
`scale * u + offset` with `u` an unsigned code in [0, 2^bits - 1]. How scale and offset are
stored differs per type (llama.cpp's ggml-common.h):

| type | block | group | bits | stored per block | weight |
|---|---|---|---|---|---|
| Q8_0 | 32 | 32 | 8 | d (f16) | d * (u - 128) |
| Q4_0, Q5_0 | 32 | 32 | 4, 5 | d (f16) | d * (u - 8), d * (u - 16) |
| Q4_1, Q5_1 | 32 | 32 | 4, 5 | d, m (f16) | d * u + m |
| Q4_K, Q5_K | 256 | 32 | 4, 5 | d, dmin (f16); 8 x (sc, m) 6-bit | d*sc_j * u - dmin*m_j |
| Q6_K | 256 | 16 | 6 | d (f16); 16 x sc int8 | d*sc_j * (u - 32) |

`BlockParams` holds those stored numbers for a (rows, blocks) slice of a weight, exactly as
they will be written; `effective()` turns them into per-group (scale, offset) in float32, the
grid that rounding (plain or GPTQ) puts codes on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SYM, AFFINE, K_AFFINE, K_SYM = "sym", "affine", "k_affine", "k_sym"


@dataclass(frozen=True)
class GGMLType:
    name: str
    block: int  # weights per block along a row
    group: int  # weights sharing one effective scale
    bits: int
    kind: str  # SYM, AFFINE, K_AFFINE or K_SYM
    # The lowest code written. Q8_0's is 1 (signed -127), as llama.cpp's own quantizer writes: its
    # int8 dot-product kernels do not compute -128 correctly (measured: a demo-model Q8_0 file
    # using -128 scored perplexity 12.112 in llama.cpp and 12.018 dequantized in transformers).
    umin: int = 0

    @property
    def umax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def center(self) -> int:
        """The code that means 0 for the symmetric kinds (u - center is the signed value)."""
        return 1 << (self.bits - 1)

    @property
    def groups_per_block(self) -> int:
        return self.block // self.group

    def gguf_type(self):
        import gguf

        return gguf.GGMLQuantizationType[self.name]

    def bytes_per_block(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[self.gguf_type()]
        assert block == self.block
        return size


BLOCK_TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("Q8_0", 32, 32, 8, SYM, umin=1),
    GGMLType("Q4_0", 32, 32, 4, SYM),
    GGMLType("Q5_0", 32, 32, 5, SYM),
    GGMLType("Q4_1", 32, 32, 4, AFFINE),
    GGMLType("Q5_1", 32, 32, 5, AFFINE),
    GGMLType("Q4_K", 256, 32, 4, K_AFFINE),
    GGMLType("Q5_K", 256, 32, 5, K_AFFINE),
    GGMLType("Q6_K", 256, 16, 6, K_SYM),
)}
FLOAT_TYPES = ("F32", "F16", "BF16")


def block_type(name: str) -> GGMLType:
    return BLOCK_TYPES[name]


def as_f16(x: Tensor) -> Tensor:
    """The float32 value of x rounded to float16, the storage of every GGUF block scale."""
    return x.to(torch.float16).float()


@dataclass
class BlockParams:
    """The stored scale numbers of a (rows, blocks) slice of one weight, for one GGMLType.

    d: (rows, blocks) float32, f16-exact. m: (rows, blocks) for AFFINE (f16-exact). dmin:
    (rows, blocks) for K_AFFINE. sc: (rows, blocks, groups_per_block) integer-valued float32,
    for K_AFFINE (0..63) and K_SYM (-128..127). mins: like sc, K_AFFINE only (0..63)."""

    type: GGMLType
    d: Tensor
    m: Tensor | None = None
    dmin: Tensor | None = None
    sc: Tensor | None = None
    mins: Tensor | None = None

    def effective(self) -> tuple[Tensor, Tensor]:
        """Per-group (scale, offset), each (rows, blocks * groups_per_block), float32: a weight in
        group g is scale[g] * u + offset[g]. Computed in the order llama.cpp's dequantization does
        (d * sc first, as one float), so the values agree to the last bit or nearly."""
        t = self.type
        rows, blocks = self.d.shape
        if t.kind == SYM:
            scale = self.d
            offset = -float(t.center) * self.d
        elif t.kind == AFFINE:
            scale, offset = self.d, self.m
        elif t.kind == K_AFFINE:
            scale = self.d.unsqueeze(-1) * self.sc
            offset = -(self.dmin.unsqueeze(-1) * self.mins)
        else:  # K_SYM
            scale = self.d.unsqueeze(-1) * self.sc
            offset = -float(t.center) * scale
        return scale.reshape(rows, -1), offset.reshape(rows, -1)

    @staticmethod
    def concat(parts: list["BlockParams"]) -> "BlockParams":
        """Join slices of consecutive blocks (along dim 1) into one."""
        def cat(field: str) -> Tensor | None:
            values = [getattr(p, field) for p in parts]
            return None if values[0] is None else torch.cat(values, dim=1)

        return BlockParams(parts[0].type, cat("d"), cat("m"), cat("dmin"), cat("sc"), cat("mins"))

    def rows(self, index: Tensor) -> "BlockParams":
        """The same params with rows reordered (llama.cpp's q/k row permutation)."""
        def pick(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[index]

        return BlockParams(self.type, pick(self.d), pick(self.m), pick(self.dmin), pick(self.sc), pick(self.mins))


def round_codes(x: Tensor, scale: Tensor, offset: Tensor, t: GGMLType) -> Tensor:
    """Nearest codes u in [t.umin, t.umax] for values x on the grid scale * u + offset (all
    broadcast). A zero scale (a block of zeros) gives the code nearest to 0 - offset = 0 there."""
    inverse = torch.where(scale == 0, 0.0, 1.0 / scale)
    return torch.round((x - offset) * inverse).clamp_(t.umin, t.umax)
