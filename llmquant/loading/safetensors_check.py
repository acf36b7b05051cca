"""Check a .safetensors file's structure by reading its header, before any tensor is loaded.

A truncated download or a half-written file otherwise surfaces deep inside transformers as an
mmap or deserialization error that names neither the file nor the cause. The checks follow the
format's definition (https://huggingface.co/docs/safetensors): 8-byte little-endian header
length N, N bytes of JSON mapping tensor names to {dtype, shape, data_offsets}, then a data
buffer that the tensors cover exactly, without gaps or overlaps. Only the header is read, so
checking a 10 GB shard costs one small read.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from llmquant.errors import CorruptCheckpointError

# Bits per element of each safetensors dtype (sub-byte float formats included).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "C64": 64,
}
# The reference implementation refuses headers above 100 MB; a larger length means garbage.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Return the tensors described by `path`'s header; raise CorruptCheckpointError if malformed."""
    path = Path(path)
    file_size = path.stat().st_size
    if file_size < 8:
        _corrupt(path, f"it is {file_size} bytes long, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER_BYTES:
            _corrupt(path, f"its header length field reads {header_len} bytes, which is not a "
                     "safetensors header (the file is garbage or not a safetensors file)")
        if 8 + header_len > file_size:
            _corrupt(path, f"its header needs {8 + header_len} bytes but the file has {file_size} "
                     "(truncated)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _corrupt(path, f"its header is not valid JSON ({e})")
    if not isinstance(header, dict):
        _corrupt(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    tensors = {name: _parse_entry(path, name, info) for name, info in header.items()}
    _check_data_buffer(path, tensors, data_size=file_size - 8 - header_len)
    return tensors


def _parse_entry(path: Path, name: str, info: object) -> TensorEntry:
    if not isinstance(info, dict):
        _corrupt(path, f"the header entry for tensor {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        _corrupt(path, f"tensor {name!r} has no dtype")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        _corrupt(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) and o >= 0 for o in offsets) and offsets[0] <= offsets[1]):
        _corrupt(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    entry = TensorEntry(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])
    bits = DTYPE_BITS.get(dtype)
    # An unknown dtype may be a format newer than this table: leave it to the loader to judge.
    if bits is not None:
        expected_bits = math.prod(entry.shape) * bits
        if expected_bits != (entry.end - entry.begin) * 8:
            _corrupt(path, f"tensor {name!r} ({dtype}, shape {list(shape)}) needs "
                     f"{expected_bits / 8:g} bytes but its data_offsets span {entry.end - entry.begin}")
    return entry


def _check_data_buffer(path: Path, tensors: dict[str, TensorEntry], data_size: int) -> None:
    """The tensors must tile the data buffer exactly: start at 0, no gaps, no overlaps, no tail."""
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.end > data_size:
            _corrupt(path, f"tensor {name!r} ends at byte {entry.end} of the data but the file holds only "
                     f"{data_size} data bytes (the file is truncated, likely an interrupted download)")
        if entry.begin != position:
            what = "overlaps the previous tensor" if entry.begin < position else "leaves a gap before it"
            _corrupt(path, f"tensor {name!r} starts at data byte {entry.begin} and {what}")
        position = entry.end
    if position != data_size:
        _corrupt(path, f"the tensors cover {position} data bytes but the file holds {data_size} "
                 "(extra bytes after the last tensor)")


def _corrupt(path: Path, reason: str) -> NoReturn:
    raise CorruptCheckpointError(
        f"The weights file {path} is corrupt: {reason}. Re-download or re-save the checkpoint "
        "(for a Hub model: `hf download ORG/NAME --force-download`, then run again)."
    )
