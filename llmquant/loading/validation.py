"""Check a model folder's files before loading: which weights it has, whether they are whole,
and whether a tokenizer is there.

Everything here fails with one of our errors naming the file at fault, so that a user never has
to decode a transformers stack trace to learn that a shard is missing or a download was cut.
The same rules apply to a Hub repository's file listing (before downloading) and to a folder on
disk (before loading), which is why `choose_weight_format` takes plain file names.
"""

from __future__ import annotations

import fnmatch
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from llmquant.errors import CorruptCheckpointError, PickleRefusedError
from llmquant.loading.safetensors_check import read_safetensors_header

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth")
# Files AutoTokenizer can build a tokenizer from (fast JSON, sentencepiece, BPE vocab, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
TOKENIZER_GLOBS = ("*.tiktoken",)

WeightFormat = Literal["safetensors", "pickle"]


@dataclass(frozen=True)
class CheckedWeights:
    format: WeightFormat
    files: tuple[Path, ...]  # every weight file transformers will open
    stored_dtypes: Counter  # safetensors dtype name -> number of tensors (empty for pickle)


def choose_weight_format(names: Iterable[str], allow_pickle: bool, where: str) -> WeightFormat:
    """Pick safetensors when present, else pickle if allowed; `names` are top-level file names."""
    names = set(names)
    if SAFETENSORS_FILE in names or SAFETENSORS_INDEX in names:
        return "safetensors"
    pickles = sorted(n for n in names if any(fnmatch.fnmatch(n, g) for g in PICKLE_GLOBS))
    loadable_pickle = PICKLE_FILE in names or PICKLE_INDEX in names
    if pickles or PICKLE_INDEX in names:
        if not allow_pickle:
            shown = ", ".join(pickles[:3] or [PICKLE_INDEX]) + (" ..." if len(pickles) > 3 else "")
            raise PickleRefusedError(
                f"{where} has only pickle weights ({shown}) and no safetensors. Loading pickle can "
                "execute arbitrary code hidden in the file, so llmquant refuses it by default. If you "
                "trust the source, pass --allow-pickle (allow_pickle=True); better, convert the "
                "weights to safetensors once and load those."
            )
        if loadable_pickle:
            return "pickle"
    others = sorted(n for n in names if n.endswith(".safetensors"))
    if others:
        adapter = " (adapter_model.safetensors is a PEFT adapter: load its base model instead)" \
            if "adapter_model.safetensors" in others else ""
        raise CorruptCheckpointError(
            f"{where} has {', '.join(others[:3])} but neither {SAFETENSORS_FILE} nor "
            f"{SAFETENSORS_INDEX}, which is what a Hugging Face model folder holds{adapter}."
        )
    ggufs = sorted(n for n in names if n.endswith(".gguf"))
    if ggufs:
        raise CorruptCheckpointError(
            f"{where} holds GGUF files ({', '.join(ggufs[:3])}) rather than a safetensors model; "
            "pass the path of one .gguf file instead."
        )
    extra = f" (it only has pickle files {', '.join(pickles[:3])}, which transformers does not " \
        f"load as a model; it expects {PICKLE_FILE})" if pickles else ""
    raise CorruptCheckpointError(
        f"{where} has no model weights: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} with its "
        f"shards{extra}. If it is a partial download, download it again."
    )


def check_weights(folder: Path, allow_pickle: bool, where: str | None = None) -> CheckedWeights:
    """Decide which weights of `folder` will load and verify they are all present and whole.

    `where` names the folder in messages ("The folder ...", "The Hub model ...").
    """
    where = where or f"The folder {folder}"
    fmt = choose_weight_format((p.name for p in folder.iterdir()), allow_pickle, where)
    if fmt == "pickle":
        files = _indexed_files(folder, PICKLE_INDEX) or (folder / PICKLE_FILE,)
        return CheckedWeights(format="pickle", files=files, stored_dtypes=Counter())
    index_files = _indexed_files(folder, SAFETENSORS_INDEX)
    files = index_files or (folder / SAFETENSORS_FILE,)
    dtypes: Counter = Counter()
    for path in files:
        tensors = read_safetensors_header(path)
        dtypes.update(entry.dtype for entry in tensors.values())
        if index_files:
            _check_index_agrees(folder / SAFETENSORS_INDEX, path, tensors.keys())
    return CheckedWeights(format="safetensors", files=files, stored_dtypes=dtypes)


def shard_names(index_path: Path) -> list[str]:
    """The shard file names a sharded-checkpoint index refers to, in first-use order."""
    weight_map = _read_index(index_path)
    return list(dict.fromkeys(weight_map.values()))


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES) or any(
        next(folder.glob(g), None) is not None for g in TOKENIZER_GLOBS
    )


def _indexed_files(folder: Path, index_name: str) -> tuple[Path, ...]:
    index_path = folder / index_name
    if not index_path.is_file():
        return ()
    names = shard_names(index_path)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise CorruptCheckpointError(
            f"The index {index_path} refers to shard {missing[0]}, which is not in the folder"
            f"{f' ({len(missing)} shards missing)' if len(missing) > 1 else ''}. The download or copy "
            "is incomplete: fetch the missing shard files again."
        )
    return tuple(folder / n for n in names)


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(
            f"The index {index_path} is not a valid sharded-checkpoint index (a JSON object with a "
            f"'weight_map'): {type(e).__name__}: {e}. Re-download or re-save the checkpoint."
        ) from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptCheckpointError(f"The index {index_path} has a malformed 'weight_map'.")
    if any("/" in v or "\\" in v or v.startswith(".") for v in weight_map.values()):
        # A shard name must be a plain file beside the index, never a path out of the folder.
        raise CorruptCheckpointError(f"The index {index_path} names shards outside its folder.")
    return weight_map


def _check_index_agrees(index_path: Path, shard: Path, names: Iterable[str]) -> None:
    """Every tensor the index assigns to `shard` must be in that shard's header."""
    expected = {t for t, f in _read_index(index_path).items() if f == shard.name}
    missing = sorted(expected - set(names))
    if missing:
        raise CorruptCheckpointError(
            f"The index {index_path} says tensor {missing[0]!r} is in {shard.name}, but that shard does "
            f"not contain it ({len(missing)} tensors missing). The shard and the index come from "
            "different saves: re-download or re-save the checkpoint."
        )
