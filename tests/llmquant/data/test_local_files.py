"""Local .txt, .jsonl and .parquet files, and the errors a user sees for bad ones."""

from __future__ import annotations

import json

import pytest
import torch

from llmquant.data import calibration_batches, evaluation_stream, load_text_split, resolve_dataset
from llmquant.errors import DataSourceError, InvalidConfigError

DOCUMENTS = [f"Document {i}: " + f"sentence number {i} about topic {i % 7}. " * (20 + i) for i in range(12)]


def _write_txt(path):
    path.write_text("\n\n".join(DOCUMENTS) + "\n", encoding="utf-8")
    return path


def _write_jsonl(path, field="text"):
    with path.open("w", encoding="utf-8") as f:
        for i, document in enumerate(DOCUMENTS):
            f.write(json.dumps({"id": i, field: document}) + "\n")
    return path


def _write_parquet(path, field="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(DOCUMENTS))), field: DOCUMENTS}), path)
    return path


@pytest.mark.parametrize("writer,name", [(_write_txt, "corpus.txt"), (_write_jsonl, "corpus.jsonl"),
                                         (_write_parquet, "corpus.parquet")])
def test_local_file_documents_are_split_without_overlap(tmp_path, writer, name):
    path = writer(tmp_path / name)
    calibration = load_text_split(path, "calibration")
    evaluation = load_text_split(str(path), "evaluation")
    # Every document comes back intact, in file order, each in exactly one split.
    assert list(calibration.documents) + list(evaluation.documents) == DOCUMENTS
    share = sum(map(len, evaluation.documents)) / sum(map(len, DOCUMENTS))
    assert 0.2 < share < 0.4
    assert str(path) in evaluation.dataset


def test_local_file_feeds_calibration_and_evaluation(tmp_path, tiny_tokenizer):
    path = _write_jsonl(tmp_path / "corpus.jsonl")
    windows = calibration_batches(tiny_tokenizer, path, num_samples=4, seq_len=32, seed=0)
    stream = evaluation_stream(tiny_tokenizer, path)
    assert windows.shape == (4, 32)
    expected = "\n\n".join(load_text_split(path, "evaluation").documents)
    assert stream.num_bytes == len(expected.encode("utf-8"))
    assert tiny_tokenizer.decode(stream.ids.tolist()) == expected


def test_custom_text_field(tmp_path):
    path = _write_parquet(tmp_path / "corpus.parquet", field="content")
    split = load_text_split(path, "evaluation", text_field="content")
    assert split.documents == tuple(DOCUMENTS[-len(split.documents):])


@pytest.mark.parametrize("writer,name", [(_write_jsonl, "c.jsonl"), (_write_parquet, "c.parquet")])
def test_missing_text_field_lists_the_columns(tmp_path, writer, name):
    path = writer(tmp_path / name, field="body")
    with pytest.raises(DataSourceError) as info:
        load_text_split(path, "evaluation")
    message = str(info.value)
    assert "'text'" in message and "body" in message and "id" in message and "--text-field" in message


def test_separate_files_are_used_whole_with_split_all(tmp_path):
    calibration_file = tmp_path / "calibration.txt"
    calibration_file.write_text("only calibration text\n\nand more of it", encoding="utf-8")
    evaluation_file = _write_txt(tmp_path / "evaluation.txt")
    assert load_text_split(calibration_file, "calibration", split="all").documents == (
        "only calibration text", "and more of it")
    assert load_text_split(evaluation_file, "evaluation", split="all").documents == tuple(DOCUMENTS)


def test_unknown_extension_lists_the_supported_ones(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(DataSourceError) as info:
        resolve_dataset(str(path))
    message = str(info.value)
    assert ".csv" in message
    for extension in (".txt", ".jsonl", ".parquet"):
        assert extension in message


def test_missing_file_is_reported_as_missing(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        load_text_split(tmp_path / "nope.txt", "evaluation")
    with pytest.raises(DataSourceError, match="does not exist"):
        load_text_split("data/not-here.jsonl", "evaluation")


def test_empty_file_and_single_document_file_are_rejected(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataSourceError):
        load_text_split(empty, "evaluation")
    single = tmp_path / "single.txt"
    single.write_text("one paragraph\nwith two lines\n", encoding="utf-8")
    with pytest.raises(DataSourceError, match="at least two"):
        load_text_split(single, "evaluation")


def test_hub_names_and_configs_are_parsed():
    spec = resolve_dataset("wikitext:wikitext-2-raw-v1")
    assert (spec.kind, spec.name, spec.config_name) == ("hub", "wikitext", "wikitext-2-raw-v1")
    assert resolve_dataset("Salesforce/wikitext", config_name="wikitext-2-raw-v1").kind == "hub"
    assert resolve_dataset(None).kind == resolve_dataset("builtin").kind == "builtin"
    with pytest.raises(InvalidConfigError, match="give it once"):
        resolve_dataset("wikitext:a", config_name="b")
    with pytest.raises(InvalidConfigError, match="no configurations"):
        resolve_dataset("builtin", config_name="x")


def test_token_windows_are_int64(tmp_path, tiny_tokenizer):
    path = _write_txt(tmp_path / "corpus.txt")
    assert calibration_batches(tiny_tokenizer, path, num_samples=2, seq_len=16).dtype == torch.long
