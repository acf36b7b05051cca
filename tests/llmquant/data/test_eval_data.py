"""`EvalData` (one typed options object for every measure) and which text it selects."""

from __future__ import annotations

import pytest

from llmquant.data import EvalData, evaluation_stream, load_text_split, scored_stream, scored_text
from llmquant.errors import DataSourceError, InvalidConfigError

DOCUMENTS = [f"Note {i}: " + f"remember item {i} of list {i % 3}. " * (10 + i) for i in range(10)]


def _notes(path):
    path.write_text("\n\n".join(DOCUMENTS) + "\n", encoding="utf-8")
    return path


def test_unknown_keys_wrong_types_and_impossible_numbers_are_refused():
    with pytest.raises(InvalidConfigError, match=r"Unknown key\(s\) 'windw'.*valid keys: .*window"):
        EvalData.build(windw=128)
    with pytest.raises(InvalidConfigError, match='max_tokens must be an integer or null; got the string "4"'):
        EvalData(max_tokens="4")
    with pytest.raises(InvalidConfigError, match="batch_size must be an integer; got true"):
        EvalData(batch_size=True)
    with pytest.raises(InvalidConfigError, match="stride must be at least 1 and at most the window"):
        EvalData(window=64, stride=65)
    with pytest.raises(InvalidConfigError, match="dtype must be one of auto, float32"):
        EvalData.build(dtype="float8")
    with pytest.raises(InvalidConfigError, match="must be an EvalData"):
        EvalData.build({"window": 64})


def test_build_sets_loading_options_by_name_and_keeps_the_rest():
    data = EvalData(dataset="notes.txt", window=256)
    changed = EvalData.build(data, dtype="float32", revision="v1", max_tokens=500)
    assert (changed.dataset, changed.window, changed.max_tokens) == ("notes.txt", 256, 500)
    assert changed.load.dtype == "float32" and changed.load.revision == "v1"
    assert changed.load_options()["revision"] == "v1"
    assert data.load.revision is None  # frozen: build returns a new object


def test_a_named_file_is_scored_whole_and_held_out_on_request(tmp_path):
    path = _notes(tmp_path / "notes.txt")
    whole = scored_text(EvalData(dataset=str(path)))
    assert whole.documents == tuple(DOCUMENTS) and whole.split == "all documents"
    held_out = scored_text(EvalData(dataset=path, split="held-out"))
    assert held_out.documents == load_text_split(path, "evaluation").documents
    assert 0 < len(held_out.documents) < len(DOCUMENTS)


def test_the_builtin_corpus_stays_on_its_held_out_split(tiny_tokenizer):
    assert scored_text(EvalData()).documents == load_text_split(None, "evaluation").documents
    # The calibration/evaluation separation API keeps the held-out split of a file too.
    stream = scored_stream(tiny_tokenizer, EvalData(max_tokens=300))
    assert stream.ids.tolist() == evaluation_stream(tiny_tokenizer, max_tokens=300).ids.tolist()


def test_held_out_names_no_calibration_split(tmp_path):
    with pytest.raises(InvalidConfigError, match="names the evaluation split"):
        load_text_split(_notes(tmp_path / "notes.txt"), "calibration", split="held-out")


def test_a_text_file_without_extension_is_read_as_plain_text(tmp_path):
    txt = _notes(tmp_path / "notes.txt")
    bare = _notes(tmp_path / "NOTES")
    assert scored_text(EvalData(dataset=str(bare))).documents == scored_text(EvalData(dataset=str(txt))).documents
    assert load_text_split(bare, "evaluation").documents == load_text_split(txt, "evaluation").documents


def test_a_binary_file_without_extension_is_refused(tmp_path):
    binary = tmp_path / "program"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    with pytest.raises(DataSourceError, match="no extension and is not UTF-8 text"):
        scored_text(EvalData(dataset=str(binary)))
    latin1 = tmp_path / "latin1"
    latin1.write_bytes("café crème brûlée\n".encode("latin-1"))
    with pytest.raises(DataSourceError, match="not UTF-8 text"):
        scored_text(EvalData(dataset=str(latin1)))


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "EMPTY"])
def test_an_empty_file_says_it_is_empty(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(DataSourceError, match="is empty: there is no text in it") as info:
        scored_text(EvalData(dataset=str(path)))
    assert "UTF-8" not in str(info.value)


def test_a_file_of_blank_lines_says_it_holds_no_text(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("\n\n   \n\t\n", encoding="utf-8")
    with pytest.raises(DataSourceError, match="holds only blank lines and spaces"):
        scored_text(EvalData(dataset=str(path)))
