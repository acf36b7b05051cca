"""Incremental detokenization with stop strings.

Decoding one token at a time is wrong for byte-level and SentencePiece tokenizers: a character
can span tokens (the first half decodes to U+FFFD) and a leading space depends on the token
before. So each step decodes a short window of recent tokens and emits only the text that
window added, once it no longer ends in a partial character (the method vLLM and TGI use).

Stop strings may span tokens, so text that could still become a stop string is held back until
it cannot; the text returned never contains the stop string, as the OpenAI API specifies.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens decoded ahead of the first generated one, for spacing


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1  # chars that may begin a stop string
        self.text = ""  # all generated text so far (truncated at a stop string once found)
        self.emitted = 0  # how much of self.text has been returned
        self.stopped_by: str | None = None

    def add(self, token_id: int) -> str:
        """Feed one generated token; returns the text now safe to emit (may be empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT_CHAR):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.stop and self.stopped_by is None:
            self._find_stop()
        if self.stopped_by is not None:
            return self.flush()
        safe = max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted:safe]
        self.emitted = safe
        return out

    def flush(self) -> str:
        """The rest of the text, once the sequence has finished; tokens still waiting for the
        rest of a character are decoded as they are (U+FFFD), as other servers do."""
        if self.stopped_by is None and self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset:])[len(prefix):]
            self.prefix_offset = self.read_offset = len(self.ids)
        out = self.text[self.emitted:]
        self.emitted = len(self.text)
        return out

    def _find_stop(self) -> None:
        start = max(0, self.emitted - self.hold)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            index, s = min(hits)
            self.text = self.text[:index]
            self.stopped_by = s

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
