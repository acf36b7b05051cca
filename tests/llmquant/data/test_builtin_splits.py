"""The built-in corpus: split sizes, no shared text between splits, reproducible windows."""

from __future__ import annotations

import pytest
import torch

from llmquant.data import (
    calibration_batches,
    evaluation_stream,
    evaluation_tokens,
    load_text_split,
    split_documents,
)
from llmquant.data.builtin import builtin_documents
from llmquant.errors import DataSourceError, InvalidConfigError


@pytest.fixture(scope="module")
def splits():
    return load_text_split(None, "calibration"), load_text_split("builtin", "evaluation")


def test_builtin_split_sizes_follow_the_eval_fraction(splits):
    calibration, evaluation = splits
    documents = builtin_documents()
    total = sum(len(d) for d in documents)
    assert total > 400_000  # the corpus is what the docs promise, not an empty stub
    share = sum(len(d) for d in evaluation.documents) / total
    assert 0.2 < share < 0.4
    # Evaluation is the trailing documents, in corpus order.
    assert evaluation.documents == documents[-len(evaluation.documents):]
    assert len(calibration.documents) + len(evaluation.documents) <= len(documents)
    assert "evaluation split" in evaluation.describe() and "characters" in evaluation.describe()


def test_no_evaluation_document_appears_in_calibration_text(splits):
    calibration, evaluation = splits
    calibration_text = calibration.text
    for document in evaluation.documents:
        assert document not in calibration_text


def test_calibration_windows_are_not_found_in_the_evaluation_stream(tiny_tokenizer):
    evaluation = evaluation_tokens(tiny_tokenizer).tolist()
    length = 128
    evaluation_windows = {tuple(evaluation[i:i + length]) for i in range(len(evaluation) - length + 1)}
    windows = calibration_batches(tiny_tokenizer, num_samples=64, seq_len=length, seed=3)
    assert windows.shape == (64, length) and windows.dtype == torch.long
    assert not any(tuple(w) in evaluation_windows for w in windows.tolist())
    # Stronger: no 128-token stretch anywhere in the calibration stream is evaluation text
    # (the corpus repeats whole passages across topics; those must have been removed).
    from llmquant.data.tokenize import tokenize_split

    calibration = tokenize_split(tiny_tokenizer, load_text_split(None, "calibration")).ids.tolist()
    shared = [i for i in range(len(calibration) - length + 1)
              if tuple(calibration[i:i + length]) in evaluation_windows]
    assert shared == []


def test_split_documents_removes_paragraphs_repeated_in_evaluation():
    evaluation_doc = "Intro paragraph.\n\nA   repeated\nparagraph that matters."
    calibration_doc = "Own text.\n\nA repeated paragraph\n   that matters.\n\nMore own text."
    calibration, evaluation = split_documents(["x" * 40, calibration_doc, evaluation_doc],
                                              eval_fraction=0.3)
    assert evaluation == [evaluation_doc]
    assert calibration == ["x" * 40, "Own text.\n\nMore own text."]


def test_windows_are_reproducible_distinct_and_depend_on_the_seed(tiny_tokenizer):
    first = calibration_batches(tiny_tokenizer, num_samples=16, seq_len=128, seed=0)
    again = calibration_batches(tiny_tokenizer, num_samples=16, seq_len=128, seed=0)
    other = calibration_batches(tiny_tokenizer, num_samples=16, seq_len=128, seed=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len({tuple(w) for w in first.tolist()}) == 16  # no window repeated


def test_windows_do_not_overlap_each_other(tiny_tokenizer):
    from llmquant.data.calibration import pick_windows

    ids = torch.arange(1000)  # distinct values make positions visible
    windows = pick_windows(ids, num_samples=9, seq_len=100, seed=5)
    used = windows.flatten().tolist()
    assert len(used) == len(set(used)) == 900
    for w in windows:  # each window is a contiguous slice of the stream
        assert torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 100))


def test_too_many_samples_says_what_fits(tiny_tokenizer):
    with pytest.raises(DataSourceError) as info:
        calibration_batches(tiny_tokenizer, num_samples=10_000, seq_len=1024)
    message = str(info.value)
    assert "10000 x 1024" in message and "at most" in message and "tokens" in message


def test_evaluation_stream_counts_bytes_of_the_text_its_tokens_cover(tiny_tokenizer):
    whole = evaluation_stream(tiny_tokenizer)
    evaluation = load_text_split(None, "evaluation")
    assert not whole.truncated
    assert whole.num_bytes == len(evaluation.text.encode("utf-8"))
    cut = evaluation_stream(tiny_tokenizer, max_tokens=5000)
    assert cut.truncated and cut.num_tokens == 5000
    assert torch.equal(cut.ids, whole.ids[:5000])
    covered = tiny_tokenizer.decode(cut.ids.tolist(), clean_up_tokenization_spaces=False)
    assert cut.num_bytes == len(covered.encode("utf-8"))
    assert evaluation.text.startswith(covered)


def test_split_documents_keeps_order_and_drops_duplicated_calibration_documents():
    documents = ["alpha " * 10, "shared", "beta " * 10, "gamma " * 5, "shared"]
    calibration, evaluation = split_documents(documents, eval_fraction=0.1)
    assert evaluation == ["shared"]
    assert calibration == ["alpha " * 10, "beta " * 10, "gamma " * 5]


def test_split_documents_needs_two_documents_and_a_sane_fraction():
    with pytest.raises(DataSourceError, match="at least two"):
        split_documents(["only one document"])
    with pytest.raises(InvalidConfigError, match="eval_fraction"):
        split_documents(["a", "b"], eval_fraction=1.5)


def test_split_all_uses_every_document():
    everything = load_text_split("builtin", "evaluation", split="all")
    assert everything.documents == builtin_documents()
    with pytest.raises(InvalidConfigError, match="no named splits"):
        load_text_split("builtin", "evaluation", split="test")
