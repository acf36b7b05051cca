"""Documents from a local .txt (.md, .text, no extension), .jsonl/.json or .parquet file, read
through `datasets`.

A text file holds one document per paragraph (text between blank lines), so joining the
documents again with a blank line gives back the file's text. A .jsonl/.json/.parquet file
holds one document per record, taken from its text field.

The file is read into memory with a throw-away cache folder: `datasets` would otherwise
write an Arrow copy of every file it reads into the user's cache, and we read each file
once per run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from llmquant.data.quiet import quiet_datasets
from llmquant.data.sources import file_loader
from llmquant.errors import DataSourceError


def read_file_documents(path: Path, text_field: str = "text") -> list[str]:
    """All documents of a local file, in file order."""
    import datasets

    loader = file_loader(path)
    options = {"sample_by": "paragraph"} if loader == "text" else {}
    try:
        with quiet_datasets(), tempfile.TemporaryDirectory(prefix="llmquant-data-") as cache:
            table = datasets.load_dataset(
                loader, data_files=str(path), split="train", cache_dir=cache,
                keep_in_memory=True, **options,
            )
    except Exception as e:  # datasets wraps parser errors in several types; all mean "unreadable"
        raise DataSourceError(
            f"Could not read {path} as {loader} ({type(e).__name__}: {_first_line(e)}). "
            "Check that the file is valid and UTF-8 encoded."
        ) from e
    if loader == "text":
        # The file's final newline stays on its last paragraph; it is not part of the text.
        documents = [p for p in (paragraph.rstrip("\n") for paragraph in table["text"]) if p]
        if not any(d.strip() for d in documents):
            raise DataSourceError(f"Dataset file {path} holds only blank lines and spaces: there is no "
                                  "text in it.")
        return documents
    return documents_from_table(table, text_field, f"file {path}")


def documents_from_table(table, text_field: str, what: str) -> list[str]:
    """The `text_field` column of a `datasets.Dataset` as a list of strings (None rows dropped)."""
    columns = list(table.column_names)
    if text_field not in columns:
        raise DataSourceError(
            f"{what[0].upper()}{what[1:]} has no text field {text_field!r}; its columns are: "
            f"{', '.join(columns) or '(none)'}. Choose one with --text-field (text_field=...)."
        )
    values = table[text_field]
    documents = []
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataSourceError(
                f"Field {text_field!r} of {what} holds {type(value).__name__} values, not text; "
                f"choose a text column with --text-field (columns: {', '.join(columns)})."
            )
        documents.append(value)
    return documents


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"
