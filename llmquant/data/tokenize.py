"""Turn a split's text into one token stream, fast and without special tokens.

The joined text is cut into pieces of about `PIECE_CHARS` characters and the pieces are
tokenized as one batch (the Rust tokenizers run a batch in parallel, and some tokenizers
are slow on very long single strings). Cuts are placed just *before* a run of newlines:
byte-level BPE pre-tokenizers (GPT-2, Llama 3, SmolLM) split text there anyway, so the
pieces tokenize to exactly the ids of the whole text (checked on the built-in corpus with
the demo tokenizer: 113,108 ids either way). A tokenizer for which a probe shows that
this does not hold gets far larger pieces (see `cuts_are_exact`).

No BOS/EOS is added, neither at the start nor between documents: the stream is the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llmquant.data.splits import TextSplit
from llmquant.errors import DataSourceError, InvalidConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PIECE_CHARS = 16_384
# For tokenizers that do not split exactly at newlines (SentencePiece with a dummy space
# prefix adds a "▁" at the start of every string), pieces are made this large instead so
# the extra tokens are at most one per ~250,000.
_INEXACT_PIECE_CHARS = 1 << 20
_PROBE = ("Alpha beta.", "\n\nGamma delta.")
_PIECES_PER_BATCH = 64


@dataclass(frozen=True)
class TokenStream:
    """A tokenized split: ids (T,), the UTF-8 size of the text they cover, and its name."""

    ids: torch.Tensor  # int64, shape (T,)
    num_bytes: int
    dataset: str
    split: str
    description: str
    truncated: bool  # True when max_tokens cut the split short

    @property
    def num_tokens(self) -> int:
        return int(self.ids.numel())


def split_into_pieces(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """Cut `text` into pieces of at most ~piece_chars, before newline (else space) runs."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > piece_chars:
        end = start + piece_chars
        low = start + piece_chars // 2
        cut = -1
        for separator in ("\n", " "):
            cut = text.rfind(separator, low, end)
            if cut > low:
                # Move to the start of the run so the whole run begins the next piece.
                while cut > low and text[cut - 1] == separator:
                    cut -= 1
                break
        if cut <= low:
            cut = end  # no whitespace in range (minified text): a plain cut is still fine
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str,
                  max_tokens: int | None = None) -> tuple[torch.Tensor, int, bool]:
    """(ids, num_bytes, truncated): ids of `text` (at most max_tokens) and the bytes they cover."""
    piece_chars = PIECE_CHARS if cuts_are_exact(tokenizer) else _INEXACT_PIECE_CHARS
    pieces = split_into_pieces(text, piece_chars)
    ids: list[int] = []
    num_bytes = 0
    for first in range(0, len(pieces), _PIECES_PER_BATCH):
        batch = pieces[first:first + _PIECES_PER_BATCH]
        # verbose=False: the stream is longer than the model's context on purpose; the
        # "sequence length is longer than the specified maximum" warning does not apply.
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False,
                            return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        for index, (piece, piece_ids) in enumerate(zip(batch, encoded), start=first):
            room = None if max_tokens is None else max_tokens - len(ids)
            if room is not None and len(piece_ids) >= room:
                kept = list(piece_ids[:room])
                ids.extend(kept)
                whole_piece = len(kept) == len(piece_ids)
                covered = piece if whole_piece else _decoded(tokenizer, kept)
                num_bytes += len(covered.encode("utf-8"))
                truncated = not whole_piece or index < len(pieces) - 1
                return torch.tensor(ids, dtype=torch.long), num_bytes, truncated
            ids.extend(piece_ids)
            num_bytes += len(piece.encode("utf-8"))
    return torch.tensor(ids, dtype=torch.long), num_bytes, False


def cuts_are_exact(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether tokenizing two pieces cut before a newline run gives the ids of the whole."""
    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    return ids(_PROBE[0]) + ids(_PROBE[1]) == ids("".join(_PROBE))


def _decoded(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    # Byte-level BPE decodes losslessly, so this is the exact text of the kept tokens.
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def tokenize_split(tokenizer: PreTrainedTokenizerBase, text_split: TextSplit,
                   max_tokens: int | None = None) -> TokenStream:
    """Tokenize a split into one stream, keeping at most `max_tokens` tokens."""
    if max_tokens is not None and max_tokens < 1:
        raise InvalidConfigError(f"max_tokens must be a positive number of tokens, not {max_tokens}.")
    ids, num_bytes, truncated = tokenize_text(tokenizer, text_split.text, max_tokens)
    if ids.numel() == 0:
        raise DataSourceError(f"{text_split.describe()} tokenizes to no tokens.")
    tokens = f"{ids.numel():,} tokens"
    if truncated:
        tokens += f" (truncated to the first {ids.numel():,} by max_tokens)"
    return TokenStream(ids=ids, num_bytes=num_bytes, dataset=text_split.dataset,
                       split=text_split.split, description=f"{text_split.describe()}, {tokens}",
                       truncated=truncated)
