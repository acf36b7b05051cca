"""What a `dataset` argument names: the built-in corpus, a local file, or a Hub dataset.

The same string is accepted by the Python API and by the CLI's `--dataset` flag:

    None or "builtin"           the built-in offline corpus (CPython's pydoc topics)
    path/to/file.txt|.jsonl|... a local file (must exist; see SUPPORTED_EXTENSIONS); a file
                                without an extension (LICENSE, NOTES) is read as plain text
                                when it is UTF-8 text
    name  or  name:config       a Hugging Face Hub dataset, e.g. "wikitext:wikitext-2-raw-v1"

Resolution fails early, before any model is loaded, so a typo costs nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmquant.errors import DataSourceError, InvalidConfigError

BUILTIN_NAME = "builtin"

# Extension -> the `datasets` packaged loader that reads it.
SUPPORTED_EXTENSIONS: dict[str, str] = {
    ".txt": "text",
    ".md": "text",
    ".text": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}

# Suffixes that make a string a file path rather than a Hub name, even when the file is
# missing or of a type we cannot read; "wikitext" and "org/name" have none of them.
_FILE_LIKE_SUFFIXES = set(SUPPORTED_EXTENSIONS) | {
    ".csv", ".tsv", ".md", ".text", ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".arrow",
    ".html", ".xml", ".pdf", ".docx", ".yaml", ".yml", ".pkl", ".pt",
}

SourceKind = Literal["builtin", "file", "hub"]
# How much of an extensionless file is checked for being text at resolve time: enough to tell a
# binary file (NUL bytes, invalid UTF-8) from text without reading a large file twice.
_TEXT_PROBE_BYTES = 1 << 16


@dataclass(frozen=True)
class DatasetSpec:
    """A resolved `dataset` argument; `describe()` names it in reports."""

    kind: SourceKind
    name: str
    config_name: str | None = None
    text_field: str = "text"
    path: Path | None = None

    def describe(self) -> str:
        if self.kind == "builtin":
            from llmquant.data.builtin import builtin_description

            return builtin_description()
        if self.kind == "file":
            return f"file {self.path}"
        return f"Hub dataset {self.name}" + (f" ({self.config_name})" if self.config_name else "")


def supported_extensions_text() -> str:
    return ", ".join(sorted(SUPPORTED_EXTENSIONS)) + " or a UTF-8 text file without an extension"


def file_loader(path: Path) -> str:
    """The `datasets` loader for a local file: by extension; plain text when it has none."""
    return SUPPORTED_EXTENSIONS[path.suffix.lower()] if path.suffix else "text"


def _looks_like_path(name: str) -> bool:
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in name:
        return True
    return Path(name).suffix.lower() in _FILE_LIKE_SUFFIXES


def resolve_dataset(
    dataset: str | os.PathLike | None = None,
    *,
    config_name: str | None = None,
    text_field: str = "text",
) -> DatasetSpec:
    """Classify `dataset` and check what can be checked without reading it."""
    if not text_field:
        raise InvalidConfigError("text_field must be a non-empty column name (default: 'text').")
    if dataset is None or (isinstance(dataset, str) and dataset.strip().lower() == BUILTIN_NAME):
        if config_name:
            raise InvalidConfigError(
                f"The built-in corpus has no configurations, but config {config_name!r} was given."
            )
        return DatasetSpec("builtin", BUILTIN_NAME, text_field=text_field)

    if isinstance(dataset, os.PathLike) or Path(str(dataset)).expanduser().exists() \
            or _looks_like_path(str(dataset)):
        if config_name:
            raise InvalidConfigError(
                f"A dataset config ({config_name!r}) only applies to Hub datasets, "
                f"not to the local file {dataset}."
            )
        path = _check_local_file(Path(dataset).expanduser())
        return DatasetSpec("file", str(path), text_field=text_field, path=path)

    name, _, inline_config = str(dataset).partition(":")
    name = name.strip()
    inline_config = inline_config.strip() or None
    if not name:
        raise InvalidConfigError(f"Dataset {dataset!r} has an empty name; expected NAME or NAME:CONFIG.")
    if inline_config and config_name and inline_config != config_name:
        raise InvalidConfigError(
            f"Dataset {dataset!r} names config {inline_config!r} but config {config_name!r} "
            "was also given; give it once."
        )
    return DatasetSpec("hub", name, config_name=inline_config or config_name, text_field=text_field)


def _check_local_file(path: Path) -> Path:
    path = path.absolute()
    if path.is_dir():
        raise DataSourceError(
            f"Dataset path {path} is a folder; give one file ({supported_extensions_text()})."
        )
    if not path.exists():
        raise DataSourceError(
            f"Dataset file {path} does not exist. Give an existing file "
            f"({supported_extensions_text()}), a Hub dataset name, or 'builtin' for the "
            "built-in corpus."
        )
    if path.suffix and path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise DataSourceError(
            f"Dataset file {path} has an unsupported type '{path.suffix}'. "
            "Supported: .txt/.md/.text or no extension (UTF-8 text, documents separated by blank "
            "lines), .jsonl/.json (one document per record, read from the text field), .parquet "
            "(one document per row, read from the text column)."
        )
    if path.stat().st_size == 0:
        raise DataSourceError(f"Dataset file {path} is empty: there is no text in it. Give a file that "
                              "holds the text, or leave --dataset unset for the built-in corpus.")
    if not path.suffix:
        _check_plain_text(path)
    return path


def _check_plain_text(path: Path) -> None:
    """Refuse an extensionless file that is not UTF-8 text (an executable, an image, an archive)."""
    import codecs

    with path.open("rb") as f:
        head = f.read(_TEXT_PROBE_BYTES)
    try:
        # final=False: the probe may end inside a multi-byte character.
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        binary = b"\x00" in head
    except UnicodeDecodeError:
        binary = True
    if binary:
        raise DataSourceError(
            f"Dataset file {path} has no extension and is not UTF-8 text (it looks like a binary "
            f"file). Give a UTF-8 text file, or a file of a supported type ({supported_extensions_text()})."
        )
