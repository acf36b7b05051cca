"""Which block type each tensor of a GGUF file gets, for a file type such as `Q4_K_M`.

A llama.cpp file type names a mixture, not one type: `Q4_K_M` stores most weights as Q4_K but
the output projection as Q6_K and half of the attention-V and FFN-down weights as Q6_K. We follow
llama.cpp's own rules (llama_tensor_get_type in src/llama-quant.cpp, for dense models) so that a
file of ours and llama.cpp's at the same type hold the same types tensor for tensor and compare
at the same size:

- 1-D tensors (norms, biases) are F32.
- The output projection (or the token embedding when the two are tied) is Q6_K, or Q8_0 when its
  rows are not a multiple of 256 or the file type is Q8_0.
- Q4_K_M / Q5_K_M: attention V and FFN down of the layers `use_more_bits` picks are Q6_K;
  Q4_K_S: the first 4 attention V and the first eighth of FFN down are Q5_K; fused QKV is Q5_K /
  Q6_K under Q4_K_M / Q5_K_M.
- Calibrated Q4_0 / Q5_0 (llama.cpp: with an imatrix; ours: GPTQ): FFN down of the first eighth
  of the layers is Q4_1 / Q5_1.
- A row length the chosen type cannot hold falls back as llama.cpp does: Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0, and a 32-block type that does not fit -> F16.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmquant.errors import InvalidConfigError
from llmquant.export.gguf.ggml_types import BLOCK_TYPES, FLOAT_TYPES

# file type -> the block type most weights get
FILE_TYPES: dict[str, str] = {
    "F32": "F32", "F16": "F16", "BF16": "BF16",
    "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of the file, as the plan needs to see it."""

    gguf_name: str
    shape: tuple[int, ...]  # torch order: (rows, cols) for a weight


def check_file_type(name: str) -> str:
    key = name.upper()
    if key not in FILE_TYPES:
        raise InvalidConfigError(f"unknown GGUF type {name!r}; choose one of: {', '.join(FILE_TYPES)}")
    return key


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _block_size(type_name: str) -> int:
    return BLOCK_TYPES[type_name].block if type_name in BLOCK_TYPES else 1


def plan_types(slots: list[TensorSlot], file_type: str, n_layers: int, *, calibrated: bool) -> dict[str, str]:
    """gguf name -> type name ("Q4_K", "F32", ...) for every slot."""
    file_type = check_file_type(file_type)
    base = FILE_TYPES[file_type]
    names = {s.gguf_name for s in slots}
    has_output = "output.weight" in names
    plan: dict[str, str] = {}
    for slot in slots:
        name = slot.gguf_name
        if len(slot.shape) < 2:
            plan[name] = "F32"
            continue
        if base in FLOAT_TYPES:
            plan[name] = base
            continue
        cols = slot.shape[-1]
        layer = _LAYER.match(name)
        i = int(layer.group(1)) if layer else -1
        new = base
        if name == "output.weight" or (not has_output and name == "token_embd.weight"):
            new = "Q8_0" if cols % _block_size(base) else ("Q6_K" if base != "Q8_0" else "Q8_0")
        elif ".attn_v." in name:
            if file_type in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n_layers):
                new = "Q6_K"
            elif file_type == "Q4_K_S" and i < 4:
                new = "Q5_K"
        elif ".ffn_down." in name:
            if file_type in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n_layers):
                new = "Q6_K"
            elif file_type == "Q4_K_S" and i < n_layers // 8:
                new = "Q5_K"
            elif file_type in ("Q4_0", "Q5_0") and calibrated and i < n_layers // 8:
                new = "Q4_1" if file_type == "Q4_0" else "Q5_1"
        elif ".attn_qkv." in name:
            new = {"Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(file_type, new)
        if cols % _block_size(new):
            new = FALLBACK.get(new, new)
            if cols % _block_size(new):
                new = "F16"
        plan[name] = new
    return plan
