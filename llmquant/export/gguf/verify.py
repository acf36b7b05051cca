"""Reading a written GGUF file back and checking it holds exactly what was meant.

`check_file` opens the file with the `gguf` package's reader (not our writer's code) and, for
every tensor, compares: the name, type and shape; for block types, every code and every stored
scale number after unpacking the blocks (blocks.unpack); for float tensors, every value. A
mismatch raises with the first offending tensor; a file that passes holds our codes bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmquant.errors import CorruptCheckpointError
from llmquant.export.gguf.blocks import unpack
from llmquant.export.gguf.ggml_types import BLOCK_TYPES

_PARAM_FIELDS = ("d", "m", "dmin", "sc", "mins")


def check_file(path: Path, architecture: str, written: dict[str, object]) -> str:
    """Compare the file with `written` (gguf name -> (codes, BlockParams) or float array); returns a
    one-line summary of what was checked."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch_field = reader.get_field("general.architecture")
    found_arch = arch_field.contents() if arch_field is not None else None
    if found_arch != architecture:
        raise CorruptCheckpointError(f"{path}: general.architecture is {found_arch!r}, expected {architecture!r}")
    tensors = {t.name: t for t in reader.tensors}
    missing = sorted(set(written) - set(tensors))
    extra = sorted(set(tensors) - set(written))
    if missing or extra:
        raise CorruptCheckpointError(f"{path}: tensors missing {missing[:3]} / unexpected {extra[:3]}")
    codes_checked = 0
    for name, expected in written.items():
        t = tensors[name]
        type_name = t.tensor_type.name
        if isinstance(expected, tuple):
            codes, params = expected
            if type_name != params.type.name:
                raise CorruptCheckpointError(f"{path}: {name} is {type_name}, expected {params.type.name}")
            rows, cols = codes.shape
            raw = np.asarray(t.data).reshape(rows, -1)
            got_codes, got = unpack(raw, BLOCK_TYPES[type_name], cols)
            if not torch.equal(got_codes, codes.to(torch.uint8)):
                raise CorruptCheckpointError(f"{path}: the codes of {name} differ from ours")
            for field in _PARAM_FIELDS:
                a, b = getattr(got, field), getattr(params, field)
                if (a is None) != (b is None) or (a is not None and not torch.equal(a.float(), b.float())):
                    raise CorruptCheckpointError(f"{path}: the stored {field} of {name} differs from ours")
            codes_checked += codes.numel()
        else:
            data = np.asarray(t.data)
            if data.tobytes() != np.ascontiguousarray(expected).tobytes():
                raise CorruptCheckpointError(f"{path}: the values of {name} differ from what was written")
    return (f"read back with the gguf reader: {len(written)} tensors, {codes_checked:,} codes and all their scales "
            "identical to ours")
