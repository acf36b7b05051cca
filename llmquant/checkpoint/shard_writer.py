"""Write a checkpoint's tensors into safetensors shards as they are produced, named and indexed
as transformers names them (`model.safetensors`, or `model-00001-of-0000N.safetensors` with
`model.safetensors.index.json`).

A streamed quantize run produces one decoder layer's tensors at a time and must not hold the
whole model, nor a whole 5 GB shard of it: each tensor's bytes go to a spool file as it comes,
and when the shard is full, its header (names, dtypes, shapes, offsets: the safetensors format,
https://github.com/huggingface/safetensors#format) is written to the shard file and the spool is
copied after it. The safetensors library writes a file from a dict of tensors held in memory
only, hence this small writer; every file it writes is read back by `safe_open` in the tests.
The final names need the number of shards, known only at the end, so `close()` renames the
files then. Shard boundaries follow one rule whether tensors come a layer at a time or all at
once (a new shard when the next tensor would pass the limit), so both ways split alike.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import torch

from llmquant.errors import InvalidConfigError

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # transformers' default "5GB"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_PENDING = ".shard-{:05d}.safetensors"
_SPOOL = ".shard-data"
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20, '1234' -> 1234 bytes (transformers' spelling)."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
        if match is None or match.group(2) not in _UNITS:
            raise InvalidConfigError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB.")
        size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size < 1:
        raise InvalidConfigError(f"--max-shard-size must be positive, not {text!r}.")
    return size


class ShardWriter:
    """Append tensors by checkpoint name; `close()` gives the final shard paths."""

    def __init__(self, folder: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.folder, self.max_shard_bytes = Path(folder), max_shard_bytes
        self.entries: dict[str, dict] = {}  # the open shard's header entries
        self.spool = None  # the open shard's data, as written so far
        self.spool_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []  # shard file, its tensor names
        self.total_bytes = 0
        self.names: set[str] = set()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if name in self.names:
                raise ValueError(f"tensor {name!r} was written twice")
            if t.dtype not in _DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors does not store")
            self.names.add(name)
            nbytes = t.numel() * t.element_size()
            if self.entries and self.spool_bytes + nbytes > self.max_shard_bytes:
                self._finish_shard()
            if self.spool is None:
                self.spool = open(self.folder / _SPOOL, "wb")
            data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self.spool.write(memoryview(data))
            self.entries[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                                  "data_offsets": [self.spool_bytes, self.spool_bytes + nbytes]}
            self.spool_bytes += nbytes
            self.total_bytes += nbytes

    def _finish_shard(self) -> None:
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        path = self.folder / _PENDING.format(len(self.written) + 1)
        if self.spool is not None:
            self.spool.close()
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            if self.spool is not None:
                out.flush()
                with open(self.folder / _SPOOL, "rb") as data:
                    _copy(data, out, self.spool_bytes)
        if self.spool is not None:
            os.unlink(self.folder / _SPOOL)
        self.written.append((path, list(self.entries)))
        self.entries, self.spool, self.spool_bytes = {}, None, 0

    def close(self) -> list[Path]:
        if self.entries or not self.written:
            self._finish_shard()
        if len(self.written) == 1:
            final = self.folder / WEIGHTS_NAME
            os.replace(self.written[0][0], final)
            return [final]
        paths, weight_map = [], {}
        for i, (path, names) in enumerate(self.written, start=1):
            final = self.folder / f"model-{i:05d}-of-{len(self.written):05d}.safetensors"
            os.replace(path, final)
            paths.append(final)
            weight_map.update({n: final.name for n in names})
        with open(self.folder / INDEX_NAME, "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2,
                      sort_keys=True)
        return paths


def _copy(src, dst, count: int) -> None:
    """The spool's bytes after the header: in the kernel where it can (no buffer in this process)."""
    done = 0
    try:
        while done < count:
            sent = os.sendfile(dst.fileno(), src.fileno(), done, count - done)
            if sent == 0:
                raise OSError("sendfile stopped early")
            done += sent
    except OSError:  # no sendfile between these files here: copy the rest through a buffer
        src.seek(done)
        dst.seek(0, os.SEEK_END)
        shutil.copyfileobj(src, dst, 16 * 1024 * 1024)


def write_weights(tensors: dict[str, torch.Tensor], folder: Path,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """A whole state dict at once: the same files a ShardWriter fed the same tensors writes."""
    writer = ShardWriter(folder, max_shard_bytes)
    writer.add(tensors)
    return writer.close()
