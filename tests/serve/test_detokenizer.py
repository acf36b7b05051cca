"""Incremental detokenization: streamed pieces add up to the full decode, stop strings cut."""

from __future__ import annotations

from llmquant.serve.detokenizer import IncrementalDetokenizer

TEXT = "Größe: 日本語のテキスト — naïve café, emoji 🙂 and plain ASCII words."


def test_pieces_concatenate_to_full_decode(tiny_tokenizer):
    ids = tiny_tokenizer(TEXT).input_ids
    # Split where the prompt ends on a character boundary, so the generated part decodes alone.
    k = next(k for k in range(3, len(ids)) if tiny_tokenizer.decode(ids[:k]) + tiny_tokenizer.decode(ids[k:]) == TEXT)
    prompt, generated = ids[:k], ids[k:]
    detok = IncrementalDetokenizer(tiny_tokenizer, prompt)
    pieces = [detok.add(t) for t in generated] + [detok.flush()]
    assert "".join(pieces) == tiny_tokenizer.decode(generated)
    assert all("\ufffd" not in p for p in pieces)  # no half characters on the way


def test_stop_string_spanning_tokens_is_cut_and_never_emitted(tiny_tokenizer):
    ids = tiny_tokenizer(TEXT).input_ids
    detok = IncrementalDetokenizer(tiny_tokenizer, [], stop=("café",))
    out = ""
    for t in ids:
        out += detok.add(t)
        if detok.stopped_by:
            break
    assert detok.stopped_by == "café"
    assert out == TEXT[:TEXT.index("café")]


def test_unfinished_character_is_flushed_at_the_end(tiny_tokenizer):
    ids = tiny_tokenizer("🙂").input_ids
    assert len(ids) > 1  # a byte-level tokenizer splits the emoji's four bytes
    detok = IncrementalDetokenizer(tiny_tokenizer, [])
    assert detok.add(ids[0]) == ""
    assert detok.flush() == tiny_tokenizer.decode(ids[:1])
