"""Chunked tokenization gives the ids of the whole text, with no special tokens."""

from __future__ import annotations

import torch

from llmquant.data.builtin import builtin_documents
from llmquant.data.tokenize import split_into_pieces, tokenize_text


def test_pieces_rebuild_the_text_and_respect_the_size():
    text = "\n\n".join(builtin_documents())
    pieces = split_into_pieces(text, piece_chars=4096)
    assert "".join(pieces) == text
    assert len(pieces) > 50
    assert all(len(p) <= 4096 for p in pieces)
    # Cuts land before a newline run, so the next piece starts with the newlines.
    assert sum(p.startswith("\n") for p in pieces[1:]) > len(pieces) // 2


def test_text_without_whitespace_is_still_cut():
    assert split_into_pieces("x" * 10_000, piece_chars=4096) == ["x" * 4096, "x" * 4096, "x" * 1808]


def test_chunked_ids_equal_whole_text_ids(tiny_tokenizer):
    text = "\n\n".join(builtin_documents()[:20])
    ids, num_bytes, truncated = tokenize_text(tiny_tokenizer, text)
    whole = tiny_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    assert len(split_into_pieces(text)) > 3  # the text really was cut
    assert ids.tolist() == whole
    assert num_bytes == len(text.encode("utf-8")) and not truncated
    assert tiny_tokenizer.bos_token_id not in ids.tolist()


def test_truncation_stops_at_max_tokens(tiny_tokenizer):
    text = "\n\n".join(builtin_documents()[:20])
    ids, num_bytes, truncated = tokenize_text(tiny_tokenizer, text, max_tokens=777)
    assert ids.dtype == torch.long and ids.numel() == 777 and truncated
    assert num_bytes < len(text.encode("utf-8"))


def test_tokenizers_that_add_a_prefix_per_string_get_whole_text_ids():
    # A SentencePiece-style tokenizer prepends "▁" to every string it is given, so cutting
    # the text would insert tokens; the probe must notice and avoid the cuts.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llmquant.data.tokenize import cuts_are_exact

    text = "\n\n".join(builtin_documents()[:20])
    alphabet = sorted(set(text) | {"▁", "<unk>"})
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[],
                                   unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert not cuts_are_exact(tokenizer)
    ids, _, _ = tokenize_text(tokenizer, text)
    assert ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]
