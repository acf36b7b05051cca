"""GGUF metadata: architecture keys, tensor names and layouts, tokenizer.

Each supported architecture is checked end to end: a tiny random model is written as a *float*
GGUF with a minimal loop over its checkpoint (the real writer adds quantized blocks on top of the
same calls), read back by transformers' GGUF loader — an independent implementation of llama.cpp's
conventions (its own reverse q/k permutation, Gemma norm shift, tokenizer rebuild) — and its
logits compared with the original model's. A wrong key, name, permutation or norm offset shows
up as different logits, not just as a file that loads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from llmquant.errors import UnsupportedArchitectureError  # noqa: E402
from llmquant.export.gguf.architectures import gguf_architecture, supported_model_types  # noqa: E402
from llmquant.export.gguf.tokenizer import UnsupportedTokenizerError, write_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # after llmquant: tests/llmquant must not shadow it
from conftest import load_test_helper  # noqa: E402  (tests/conftest.py: loads tests/architectures.py once)

# Architectures transformers' GGUF loader can read back (others are checked in llama.cpp by hand).
ROUND_TRIP = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"]
# Config values transformers' GGUF loader (5.25) does not read back for a family, although the file
# has them (llama.cpp reads `{arch}.attention.key_length`; test_metadata_keys checks it is written).
# Qwen3Config's default head_dim is 128 (every real Qwen3); the tiny model's is 16.
# Gemma's query scale: transformers' default 256 (real Gemma's head_dim); llama.cpp uses 1/sqrt(head_dim).
LOADER_GAPS = {"qwen3": dict(head_dim=16), "gemma2": dict(query_pre_attn_scalar=16),
               "gemma3_text": dict(query_pre_attn_scalar=16)}
GEMMA = ("gemma2", "gemma3_text")
SAMPLE = "Hello world! The quick brown fox, 12345 and 3.14 -- <|im_start|>user\nhi<|im_end|>\n  spaces\ttab"


def write_float_gguf(folder: Path, out: Path) -> Path:
    """A float32 GGUF of the checkpoint in `folder`, through the metadata API only."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    arch = gguf_architecture(config)
    writer = gguf.GGUFWriter(str(out), arch.name)
    # Names matter to both readers: transformers (5.25) maps a general.name of exactly "mistral" to
    # a tensor map gguf-py lacks, and llama.cpp applies Phi-3's SentencePiece token fixes (looking
    # up "</s>") to any model whose name contains "phi3" or "phi-3".
    writer.add_name("tiny test model")
    arch.write_hparams(writer)
    write_tokenizer(writer, AutoTokenizer.from_pretrained(folder), config)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for hf_name in f.keys():
                if arch.skips(hf_name):
                    continue
                tensor = f.get_tensor(hf_name).float()
                order = arch.row_order(hf_name, tensor.shape[0])
                if order is not None:
                    tensor = tensor[order]
                tensor = arch.float_transform(hf_name, tensor)
                writer.add_tensor(arch.tensor_name(hf_name), tensor.contiguous().numpy())
    for name, tensor in arch.extra_tensors().items():
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].float()


def _gemma_dir(model_type: str, path: Path, tokenizer) -> Path:
    """tests/architectures.py's tiny Gemma as real Gemmas are: tied embeddings, and a query scale of
    1/sqrt(head_dim) (the tiny config keeps transformers' default 256 with head_dim 16, which
    llama.cpp cannot express — test_gemma_query_scale_mismatch_is_refused)."""
    from transformers import AutoModelForCausalLM

    config = load_test_helper("architectures").build_config(model_type, tokenizer)
    config.tie_word_embeddings, config.query_pre_attn_scalar = True, config.head_dim
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "embed" not in name:
                p.mul_(2.0)
            elif "norm" in name:
                p.normal_(0.0, 0.5)  # zero-initialised (1 + w) norms would hide a missing offset
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(architecture_dir, tiny_tokenizer, tmp_path_factory):
    """model type -> (source folder, GGUF path), written once per module."""
    done: dict[str, tuple[Path, Path]] = {}

    def get(model_type: str):
        if model_type not in done:
            if model_type in GEMMA:
                folder = _gemma_dir(model_type, tmp_path_factory.mktemp(model_type) / "src", tiny_tokenizer)
            else:
                folder = architecture_dir(model_type)
            out = tmp_path_factory.mktemp(f"gguf-{model_type}") / "model.gguf"
            done[model_type] = (folder, write_float_gguf(folder, out))
        return done[model_type]

    return get


@pytest.mark.parametrize("model_type", ROUND_TRIP)
def test_float_gguf_reproduces_logits(model_type, exported):
    from transformers import AutoModelForCausalLM

    folder, path = exported(model_type)
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                  **LOADER_GAPS.get(model_type, {}))
    ids = torch.tensor([[5, 17, 250, 3, 99, 400, 7, 42, 128, 64, 300, 1]])
    want, got = _logits(original, ids), _logits(loaded, ids)
    assert got.shape == want.shape
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1).min()
    assert cosine >= 0.99999, f"{model_type}: cosine {cosine}"
    assert (got - want).abs().max() < 1e-3 * want.abs().max()


def test_tokenizer_round_trip(exported):
    from transformers import AutoTokenizer

    folder, path = exported("llama")
    original = AutoTokenizer.from_pretrained(folder)
    rebuilt = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert rebuilt(SAMPLE)["input_ids"] == original(SAMPLE)["input_ids"]
    assert rebuilt.decode(original(SAMPLE)["input_ids"]) == original.decode(original(SAMPLE)["input_ids"])
    for attr in ("bos_token", "eos_token", "pad_token"):
        assert getattr(rebuilt, attr) == getattr(original, attr)
    messages = [{"role": "user", "content": "hi"}]
    assert rebuilt.chat_template == original.chat_template
    assert rebuilt.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _metadata(path: Path):
    reader = gguf.GGUFReader(str(path))
    return reader, lambda key: reader.fields[key].contents()


def test_metadata_keys(exported):
    """What transformers does not read back but llama.cpp does: head width, rope dims, pre-tokenizer, types."""
    reader, value = _metadata(exported("llama")[1])

    assert value("general.architecture") == "llama"
    assert value("llama.attention.key_length") == 16 and value("llama.rope.dimension_count") == 16
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    types = value("tokenizer.ggml.token_type")
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == value("llama.vocab_size")
    assert types[tokens.index("<|im_start|>")] == gguf.TokenType.CONTROL
    assert value("tokenizer.ggml.add_bos_token") is False
    assert "output.weight" in {t.name for t in reader.tensors}  # the tiny models are untied
    _, value = _metadata(exported("qwen3")[1])
    assert value("qwen3.attention.key_length") == 16 and value("qwen3.attention.value_length") == 16


def test_llama_row_order_is_the_converters_permute():
    """row_order as indices equals convert_hf_to_gguf's LlamaModel.permute on q (heads) and k (kv heads)."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_hidden_layers=1, intermediate_size=128)
    arch = gguf_architecture(config)
    for name, heads in (("model.layers.0.self_attn.q_proj.weight", 4), ("model.layers.0.self_attn.k_proj.bias", 2)):
        w = torch.randn(heads * 16, 8)
        permuted = w.reshape(heads, 2, 8, 8).swapaxes(1, 2).reshape(w.shape)
        assert torch.equal(w[arch.row_order(name, w.shape[0])], permuted)
    assert arch.row_order("model.layers.0.self_attn.v_proj.weight", 32) is None


def test_tied_embeddings_and_names():
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    arch = gguf_architecture(config)
    assert arch.skips("lm_head.weight") and not arch.skips("model.embed_tokens.weight")
    assert arch.tensor_name("model.layers.1.self_attn.k_proj.bias") == "blk.1.attn_k.bias"
    assert arch.tensor_name("model.norm.weight") == "output_norm.weight"
    with pytest.raises(UnsupportedArchitectureError, match="no llama.cpp name"):
        arch.tensor_name("model.layers.0.self_attn.surprise.weight")


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_unsupported_architectures_are_refused(model_type):
    from transformers import AutoConfig

    with pytest.raises(UnsupportedArchitectureError) as err:
        gguf_architecture(AutoConfig.for_model(model_type))
    assert "not supported" in str(err.value) and "llama" in str(err.value)


def test_unknown_model_type_names_supported_ones():
    from transformers import AutoConfig

    with pytest.raises(UnsupportedArchitectureError, match="gpt2") as err:
        gguf_architecture(AutoConfig.for_model("gpt2"))
    assert all(t in str(err.value) for t in supported_model_types())


def test_sentencepiece_tokenizer_is_refused(tmp_path):
    """A Llama-2-style tokenizer (BPE with byte fallback, Metaspace) must not be written as gpt2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={"<unk>": 0, "\u2581a": 1, "a": 2}, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    writer = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    with pytest.raises(UnsupportedTokenizerError, match="SentencePiece"):
        write_tokenizer(writer, fast, LlamaConfig(vocab_size=3))


@pytest.mark.demo
def test_demo_tokenizer_is_smollm(demo_model_dir, tmp_path):
    """The demo tokenizer is recognised as llama.cpp's converter recognises SmolLM ("smollm")."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(demo_model_dir)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    write_tokenizer(writer, AutoTokenizer.from_pretrained(demo_model_dir), config)
    kv = writer.kv_data[0]
    assert kv["tokenizer.ggml.pre"].value == "smollm"
    assert kv["tokenizer.ggml.add_bos_token"].value is False
    assert len(kv["tokenizer.ggml.tokens"].value) == config.vocab_size == 49152
    assert "<|im_start|>" in kv["tokenizer.chat_template"].value


@pytest.mark.parametrize("model_type", GEMMA)
def test_gemma_query_scale_mismatch_is_refused(model_type, architecture_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(architecture_dir(model_type))
    config.tie_word_embeddings = True
    with pytest.raises(UnsupportedArchitectureError, match="query_pre_attn_scalar"):
        gguf_architecture(config)


def test_gemma_norm_offset_and_sliding_pattern(exported):
    from safetensors import safe_open

    folder, path = exported("gemma3_text")
    reader, value = _metadata(path)
    assert list(value("gemma3.attention.sliding_window_pattern")) == [True, True]  # both tiny layers slide
    assert value("gemma3.rope.freq_base") == 1_000_000.0 and value("gemma3.rope.freq_base_swa") == 10_000.0
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_q_norm.weight")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_norm.weight").float()
    assert torch.allclose(torch.from_numpy(stored.data.copy()), 1.0 + w)
    assert "output.weight" not in {t.name for t in reader.tensors}


def test_olmo2_writes_every_tensor(exported):
    """transformers cannot read OLMo 2 GGUFs: check names and keys (logits checked in llama.cpp by hand)."""
    from safetensors import safe_open

    folder, path = exported("olmo2")
    reader, value = _metadata(path)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert len(reader.tensors) == len(list(f.keys()))
    names = {t.name for t in reader.tensors}
    assert {"blk.1.attn_q_norm.weight", "blk.1.post_attention_norm.weight", "blk.1.post_ffw_norm.weight"} <= names
    assert value("general.architecture") == "olmo2"


def test_pre_tokenizer_names_follow_the_splitting():
    """Llama 3 and Qwen 2 tokenizer.json pre-tokenizers get llama.cpp's names; a variant is refused."""
    from llmquant.export.gguf import tokenizer as gt

    def spec(split, ignore_merges, normalizer=None):
        return {"normalizer": normalizer, "model": {"type": "BPE", "ignore_merges": ignore_merges},
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}

    assert gt.pre_tokenizer_name(spec(gt._LLAMA3_SPLIT, True)) == "llama-bpe"
    assert gt.pre_tokenizer_name(spec(gt._QWEN2_SPLIT, False, {"type": "NFC"})) == "qwen2"
    with pytest.raises(UnsupportedTokenizerError):
        gt.pre_tokenizer_name(spec(gt._LLAMA3_SPLIT, False))  # llama.cpp would ignore merges here
    with pytest.raises(UnsupportedTokenizerError):
        gt.pre_tokenizer_name(spec(gt._QWEN2_SPLIT.replace(r"\p{N}", r"\p{N}+"), False))
