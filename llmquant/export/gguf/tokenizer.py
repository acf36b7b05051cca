"""The tokenizer as llama.cpp reads it: the `tokenizer.ggml.*` keys of a GGUF file.

llama.cpp does not run a tokenizer.json. For byte-level BPE (`tokenizer.ggml.model = "gpt2"`) it
takes the vocabulary, the merges and the special ids from metadata, and picks its pre-tokenizer —
the regex that splits text before BPE, plus a few flags — by *name* (`tokenizer.ggml.pre`). A
wrong name gives a file that loads and tokenizes differently.

Like llama.cpp's own converter, a known Hub tokenizer is recognised first by a hash of the ids it
gives a test string (which also pins its vocabulary), and gets the name llama.cpp's converter would
give it: the demo model (SmolLM2) is "smollm". Other tokenizers — a retrained vocabulary like our
tiny test models' — are named after their pre-tokenizer itself (`pre_tokenizer_name`); one that
matches none of the names below is refused, never written with a guess.
"""

from __future__ import annotations

import json
from hashlib import sha256
from typing import Any

from llmquant.errors import UnsupportedArchitectureError

# llama.cpp's regexes for these names (src/llama-vocab.cpp), as HF tokenizer.json spells them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# chktxt and hashes copied from llama.cpp's conversion/base.py (get_vocab_base_pre): the sha256 of
# str(tokenizer.encode(_CHKTXT)) identifies a known Hub tokenizer; the value is llama.cpp's pre name.
_CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
_KNOWN_HASHES = {
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",  # evilfreelancer/ruGPT3XL
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
}

# llama.cpp token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


class UnsupportedTokenizerError(UnsupportedArchitectureError):
    """A tokenizer llama.cpp's metadata cannot describe faithfully."""


def write_tokenizer(writer, tokenizer, config) -> None:
    """Write the tokenizer.ggml.* keys and the chat template for a byte-level BPE tokenizer.

    `tokenizer` is a transformers fast tokenizer; `config` the model's config (its vocab_size is the
    number of embedding rows, which the token list must match)."""
    spec = _tokenizer_json(tokenizer)
    known = _KNOWN_HASHES.get(sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest())
    pre = known or pre_tokenizer_name(spec)
    tokens, types = token_list(tokenizer, config.vocab_size)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges(spec))
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, attr, None)
        if token_id is not None:
            add(int(token_id))
    add_bos, add_eos = added_special_tokens(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: llama.cpp takes a list of {name, template}
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        writer.add_chat_template(template)


def _tokenizer_json(tokenizer) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedTokenizerError(
            f"{type(tokenizer).__name__} has no tokenizer.json (a slow / SentencePiece-only tokenizer); GGUF export "
            "supports byte-level BPE tokenizers loaded as fast tokenizers.")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or not _is_byte_level(spec.get("decoder")):
        raise UnsupportedTokenizerError(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2 / Llama 3 / Qwen style); this one is "
            f"{model.get('type')} (byte_fallback={model.get('byte_fallback')}, decoder "
            f"{(spec.get('decoder') or {}).get('type')}), e.g. a SentencePiece tokenizer, which is not supported yet.")
    return spec


def _is_byte_level(part: dict | None) -> bool:
    if not part:
        return False
    if part.get("type") == "Sequence":
        return any(_is_byte_level(p) for p in part.get("decoders") or part.get("pretokenizers") or ())
    return part.get("type") == "ByteLevel"


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for what this tokenizer.json does before BPE, or UnsupportedTokenizerError."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    ignore_merges = bool(spec["model"].get("ignore_merges"))
    normalizer = (spec.get("normalizer") or {}).get("type")

    def byte_level(use_regex: bool) -> bool:
        s = steps[-1]
        return s.get("type") == "ByteLevel" and not s.get("add_prefix_space") and bool(s.get("use_regex")) == use_regex

    def split(regex: str) -> bool:
        s = steps[0]
        return (s.get("type") == "Split" and s.get("pattern", {}).get("Regex") == regex
                and s.get("behavior") == "Isolated" and not s.get("invert"))

    name = None
    if len(steps) == 1 and byte_level(use_regex=True):
        name = "gpt-2"            # GPT-2's regex inside ByteLevel
    elif len(steps) == 2 and byte_level(use_regex=True) and steps[0] == {"type": "Digits", "individual_digits": True}:
        name = "smollm"           # digits one by one, then GPT-2's regex (SmolLM, StarCoder)
    elif len(steps) == 2 and byte_level(use_regex=False) and split(_LLAMA3_SPLIT):
        name = "llama-bpe"        # Llama 3
    elif len(steps) == 2 and byte_level(use_regex=False) and split(_QWEN2_SPLIT):
        name = "qwen2"            # Qwen 2 / 2.5 / 3
    # llama.cpp's "llama-bpe" always looks whole words up before merging (ignore_merges); the others never do.
    if name is not None and ignore_merges != (name == "llama-bpe"):
        name = None
    # llama.cpp applies no normalizer. NFC changes only text that is not already composed, which
    # is why llama.cpp's converter accepts Qwen's NFC too; anything else would change the ids.
    if normalizer not in (None, "NFC"):
        name = None
    if name is None:
        raise UnsupportedTokenizerError(
            "this tokenizer's pre-tokenizer has no llama.cpp equivalent that GGUF export knows "
            f"(pre_tokenizer {json.dumps(pre)[:300]}, normalizer {normalizer}, ignore_merges {ignore_merges}); "
            "supported: GPT-2 byte-level, SmolLM digits + byte-level, Llama 3, Qwen 2.")
    return name


def token_list(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """One token per embedding row, with llama.cpp's token types, as its converter writes them."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UnsupportedTokenizerError(
            f"the tokenizer has token id {max(vocab.values())}, but the model has only {vocab_size} embedding rows.")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            # Rows past the tokenizer (vocab padded to a multiple of 64 or 128) still need a token.
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        token = by_id[i]
        tokens.append(token)
        if i not in added:
            types.append(NORMAL)
        elif added[i].special or _looks_special(token):
            types.append(CONTROL)
        else:
            types.append(USER_DEFINED)
    return tokens, types


def _looks_special(token: str) -> bool:
    # llama.cpp's converter marks <|...|> added tokens CONTROL even when not flagged special.
    return token.startswith("<|") and token.endswith("|>")


def merges(spec: dict[str, Any]) -> list[str]:
    # tokenizers >= 0.20 stores merges as pairs; older files as "a b" strings. llama.cpp wants strings.
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def added_special_tokens(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS in front and EOS at the end, read from what the tokenizer does."""
    text = "Hello"
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    full = tokenizer(text)["input_ids"]
    start = full.index(plain[0]) if plain and plain[0] in full else 0
    prefix, suffix = full[:start], full[start + len(plain):]
    if prefix not in ([], [tokenizer.bos_token_id]) or suffix not in ([], [tokenizer.eos_token_id]):
        raise UnsupportedTokenizerError(
            f"the tokenizer adds {prefix} before and {suffix} after the text; llama.cpp can only add BOS "
            "before and EOS after.")
    return bool(prefix), bool(suffix)
