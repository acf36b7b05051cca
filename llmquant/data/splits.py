"""Calibration and evaluation splits that never share text.

The split is made on whole documents, before tokenizing, so it does not depend on the
tokenizer: two models with different tokenizers are evaluated on exactly the same text.

* Built-in corpus and local files: documents keep their order; the evaluation split is
  the trailing documents holding (as close as possible to) `eval_fraction` of the
  characters, calibration is the documents before them, minus every paragraph that
  also appears in the evaluation split (so repeated passages cannot leak evaluation
  text into calibration).
* Hub datasets with their own splits: calibration is "train", evaluation is "test"
  (or "validation" when there is no "test"). A Hub dataset with only one split is
  divided like a local file.
* `split=` overrides the choice: "all" takes every document of a file or of the built-in
  corpus (for when calibration and evaluation come from separate files); "held-out" names
  the default evaluation split explicitly; for a Hub dataset any `datasets` split
  expression works ("validation", "train[:10%]").
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from llmquant.data.sources import DatasetSpec, resolve_dataset
from llmquant.errors import DataSourceError, InvalidConfigError

DEFAULT_EVAL_FRACTION = 0.3
DOCUMENT_SEPARATOR = "\n\n"
ALL = "all"
HELD_OUT = "held-out"  # the evaluation split, named explicitly (what split=None gives for "evaluation")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")

Part = Literal["calibration", "evaluation"]


@dataclass(frozen=True)
class TextSplit:
    """The documents of one split, and how to name them in a report."""

    documents: tuple[str, ...]
    dataset: str  # e.g. "builtin corpus (CPython 3.11 pydoc topics)"
    split: str  # e.g. "evaluation split (last 16 of 79 documents, 28.9% of characters)", "split 'test'"

    @functools.cached_property
    def text(self) -> str:
        """The documents joined into one stream, as the model reads them."""
        return DOCUMENT_SEPARATOR.join(self.documents)

    @property
    def num_characters(self) -> int:
        return len(self.text)

    def describe(self) -> str:
        return (f"{self.dataset}, {self.split}: {len(self.documents):,} documents, "
                f"{self.num_characters:,} characters")


def split_documents(
    documents: Sequence[str], eval_fraction: float = DEFAULT_EVAL_FRACTION
) -> tuple[list[str], list[str]]:
    """(calibration, evaluation) documents; evaluation is a suffix of `documents`."""
    _check_fraction(eval_fraction)
    if len(documents) < 2:
        raise DataSourceError(
            f"The dataset holds {len(documents)} document(s), but a calibration/evaluation split "
            "needs at least two: documents are never cut, so that the two splits share no text. "
            "In a .txt file, separate documents with blank lines; or keep calibration and "
            "evaluation text in separate files and use split='all' (--split all) on each."
        )
    total = sum(len(d) for d in documents)
    target = eval_fraction * total
    best_count, best_gap, suffix_chars = 1, float("inf"), 0
    # At least one document on each side; pick the suffix whose size is nearest the target.
    for count in range(1, len(documents)):
        suffix_chars += len(documents[-count])
        gap = abs(suffix_chars - target)
        if gap < best_gap:
            best_count, best_gap = count, gap
    evaluation = list(documents[-best_count:])
    return remove_shared_paragraphs(documents[:-best_count], evaluation), evaluation


def remove_shared_paragraphs(calibration: Sequence[str], evaluation: Sequence[str]) -> list[str]:
    """`calibration` without any paragraph that also occurs in `evaluation`.

    Whole documents are not the only way text repeats: in the built-in corpus the
    "compound" topic contains the "try", "while" and "with" topics almost verbatim. A
    paragraph (text between blank lines) is compared with whitespace collapsed, so
    re-indented or re-wrapped copies are caught too. Documents left empty are dropped.
    """
    shared = {_normalized(p) for document in evaluation for p in _PARAGRAPH_BREAK.split(document)}
    kept_documents = []
    for document in calibration:
        paragraphs = _PARAGRAPH_BREAK.split(document)
        kept = [p for p in paragraphs if _normalized(p) not in shared]
        if len(kept) == len(paragraphs):
            kept_documents.append(document)  # untouched: keep its exact original spacing
        elif kept:
            kept_documents.append(DOCUMENT_SEPARATOR.join(kept))
    return kept_documents


def _normalized(paragraph: str) -> str:
    return " ".join(paragraph.split())


def load_text_split(
    dataset: str | os.PathLike | None = None,
    part: Part = "evaluation",
    *,
    split: str | None = None,
    config_name: str | None = None,
    text_field: str = "text",
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
) -> TextSplit:
    """The calibration or evaluation documents of `dataset` (see the module docstring)."""
    if part not in ("calibration", "evaluation"):
        raise InvalidConfigError(f"part must be 'calibration' or 'evaluation', not {part!r}.")
    _check_fraction(eval_fraction)
    if split == HELD_OUT:
        if part == "calibration":
            raise InvalidConfigError(
                f"split={HELD_OUT!r} names the evaluation split; calibration reads the rest of the "
                "documents. Leave split unset for calibration, or use 'all'."
            )
        split = None
    spec = resolve_dataset(dataset, config_name=config_name, text_field=text_field)
    if spec.kind == "hub":
        result = _hub_split(spec, part, split, eval_fraction)
    else:
        result = _local_split(spec, part, split, eval_fraction)
    if not result.text.strip():
        raise DataSourceError(
            f"The {result.split} of {result.dataset} holds no text; choose another dataset or split."
        )
    return result


def _local_split(spec: DatasetSpec, part: Part, split: str | None,
                 eval_fraction: float) -> TextSplit:
    if split not in (None, ALL):
        raise InvalidConfigError(
            f"{spec.describe()} has no named splits, so split={split!r} does not apply; leave it "
            f"unset for the {part} split (documents are divided {1 - eval_fraction:.0%}/"
            f"{eval_fraction:.0%}; '{HELD_OUT}' names the last {eval_fraction:.0%}), or use 'all' for "
            "every document."
        )
    if spec.kind == "builtin":
        from llmquant.data.builtin import builtin_documents

        documents: Sequence[str] = builtin_documents()
    else:
        from llmquant.data.files import read_file_documents

        assert spec.path is not None
        documents = read_file_documents(spec.path, spec.text_field)
    if split == ALL:
        return TextSplit(tuple(documents), spec.describe(), "all documents")
    return _divided(documents, spec.describe(), part, eval_fraction, source_split=None)


def _hub_split(spec: DatasetSpec, part: Part, split: str | None,
               eval_fraction: float) -> TextSplit:
    from llmquant.data.hub import hub_split_names, read_hub_documents

    if split is not None:
        return TextSplit(tuple(read_hub_documents(spec, split)), spec.describe(), f"split {split!r}")
    names = hub_split_names(spec)
    evaluation_name = next((n for n in ("test", "validation") if n in names), None)
    if "train" in names and evaluation_name is not None:
        chosen = "train" if part == "calibration" else evaluation_name
        return TextSplit(tuple(read_hub_documents(spec, chosen)), spec.describe(), f"split {chosen!r}")
    if not names:
        raise DataSourceError(f"{spec.describe()} defines no splits; give one with split=... (--split).")
    # No train/evaluation pair: divide one split's documents like a local file's.
    only = "train" if "train" in names else names[0]
    documents = read_hub_documents(spec, only)
    return _divided(documents, spec.describe(), part, eval_fraction, source_split=only)


def _divided(documents: Sequence[str], dataset: str, part: Part, eval_fraction: float,
             source_split: str | None) -> TextSplit:
    if not any(d.strip() for d in documents):
        raise DataSourceError(f"{dataset} holds no text; choose another dataset.")
    calibration, evaluation = split_documents(documents, eval_fraction)
    total = sum(len(d) for d in documents) or 1
    share = sum(len(d) for d in evaluation) / total
    of = f" of split {source_split!r}" if source_split else ""
    if part == "calibration":
        chosen = calibration
        leading = documents[:len(documents) - len(evaluation)]
        removed = sum(len(d) for d in leading) - sum(len(d) for d in calibration)
        label = (f"calibration split (first {len(leading)} of {len(documents)} documents{of}, "
                 f"{1 - share:.1%} of characters"
                 + (f", less {removed:,} characters of paragraphs that also appear in the "
                    "evaluation split" if removed else "") + ")")
    else:
        chosen = evaluation
        label = (f"evaluation split (last {len(evaluation)} of {len(documents)} documents{of}, "
                 f"{share:.1%} of characters)")
    return TextSplit(tuple(chosen), dataset, label)


def _check_fraction(eval_fraction: float) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise InvalidConfigError(
            f"eval_fraction must be between 0 and 1 (exclusive), not {eval_fraction!r}."
        )
