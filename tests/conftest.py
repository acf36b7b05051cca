"""Shared fixtures: a tiny random-weight Llama with a real BPE tokenizer, and the demo model.

Unit tests use the tiny model (seconds); tests marked `demo` use the real SmolLM2-135M demo
model for behaviour that needs real text (perplexity ratios, logits agreement).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests must never reach the Hub by accident, and must not touch the user's cache.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _corpus_text(max_chars: int = 200_000) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:max_chars]


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained in about a second on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_corpus_text()], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def make_tiny_model_dir(path: Path, *, hidden: int = 128, intermediate: int = 256, layers: int = 2,
                        heads: int = 4, kv_heads: int = 2, dtype=torch.bfloat16, seed: int = 0,
                        tokenizer=None, tie: bool = True) -> Path:
    """Save a random-weight LlamaForCausalLM with a real tokenizer as a safetensors folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or build_tiny_tokenizer()
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=len(tokenizer),
        max_position_embeddings=512, tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    # A random init gives near-uniform outputs; widen the weights a little so that
    # quantization error is visible in the logits (tests assert on it).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.mul_(2.0)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama (hidden 128, 2 layers) saved as bf16 safetensors. Treat as read-only."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "tiny-llama", tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def architecture_dir(tmp_path_factory, tiny_tokenizer):
    """`architecture_dir(model_type)`: a tiny random `model_type` model folder (tests/architectures.py),
    built once per session. Treat as read-only."""
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("architectures")

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = load_test_helper("architectures").make_architecture_dir(
                model_type, root / model_type, tiny_tokenizer)
        return built[model_type]

    return get


def load_test_helper(name: str):
    """tests/NAME.py as a module. The test folders are not packages (pytest runs in importlib
    mode), so a helper is loaded by path, once."""
    import importlib.util
    import sys

    key = f"llmquant_tests_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).parent / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up while building a class
        spec.loader.exec_module(module)
    return sys.modules[key]


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The real demo model (SmolLM2-135M-Instruct), materialized once into the llmquant cache."""
    from llmquant.loading.demo import ensure_demo_model

    return ensure_demo_model(quiet=True)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> torch.device:
    """Run a test on CPU, and also on CUDA when present (skipped otherwise)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    return torch.device(request.param)
