"""The engine on a tiny model of every architecture in the support matrix (tests/architectures.py):
greedy tokens equal transformers' generate() token for token, for one prompt and for prompts of
different lengths prefilled together (left-padded) and decoded as one batch. The prompts reach
past the models' sliding windows (32 tokens), in the prefill and while decoding.

The Llama-shaped models run the lean forward; two variants of them with small windows (all
layers: Mistral; some layers: Qwen2) check its sliding-window masks, with and without the CPU
kernels. Every other architecture must be refused by `LeanForward.supports`, not left to the
short probe: the probe cannot see what only differs on long inputs.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch

from llmquant.serve.engine import Engine
from llmquant.serve.forward.lean import LeanForward, TorchSteps
from llmquant.serve.sampling import SamplingParams


def _architectures():
    # The test folders are not packages (importlib mode): the helper is loaded by path.
    key = "llmquant_tests_architectures"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).parents[1] / "architectures.py")
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


MATRIX = list(_architectures().ARCHITECTURES)
LEAN = {"llama", "mistral", "qwen2"}
# Llama-shaped models whose sliding window (8 tokens) the prompts cross: config edits of the
# matrix's folders (same weights).
WINDOWED = {
    "mistral-window8": ("mistral", dict(sliding_window=8)),
    "qwen2-window8-layer1": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                           layer_types=["full_attention", "sliding_attention"])),
}
NEW_TOKENS = 12
PROMPT = "The quick brown fox jumps over the lazy dog"  # 30 tokens: decoding crosses a 32-token window
BATCH = ["Exceptions are raised when an error occurs; a handler may catch them and go on.",  # 38 tokens
         "In", "def main():\n    return 1 if x else"]  # 2 and 22 tokens


@pytest.fixture(scope="module")
def loaded_models(architecture_dir, tmp_path_factory):
    """model name -> float32 LoadedModel, loaded once for this module."""
    from llmquant.loading import load_model

    cache = {}

    def get(name: str):
        if name not in cache:
            base, edits = WINDOWED.get(name, (name, None))
            folder = architecture_dir(base)
            if edits:
                folder = shutil.copytree(folder, tmp_path_factory.mktemp("windowed") / name)
                config = json.loads((folder / "config.json").read_text())
                (folder / "config.json").write_text(json.dumps({**config, **edits}))
            cache[name] = load_model(folder, device="cpu", dtype="float32")
        return cache[name]

    return get


def reference(loaded, ids: list[int]) -> list[int]:
    """transformers' greedy generate() of one unpadded prompt; it stops at EOS as the engine does."""
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                    pad_token_id=loaded.tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def run_together(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    """Submit every prompt while the engine loop is held, so that they are admitted (and
    prefilled, left-padded) in one step; each one's generated tokens."""
    tokens: list[list[int]] = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def receiver(k: int):
        def receive(event):
            if event.token_id is not None:
                tokens[k].append(event.token_id)
            if event.finish_reason is not None:
                done.release()
        return receive

    with engine._cond:
        for k, ids in enumerate(prompts):
            engine.submit(ids, SamplingParams(temperature=0, max_tokens=NEW_TOKENS), receiver(k))
    for _ in prompts:
        assert done.acquire(timeout=60)
    return tokens


def check_engine(loaded) -> Engine:
    """The engine's single and batched greedy tokens against generate(); returns the engine (shut down)."""
    tok = loaded.tokenizer
    engine = Engine(loaded, max_batch_size=4)
    try:
        ids = tok(PROMPT).input_ids
        single = [e.token_id for e in engine.generate(ids, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
                  if e.token_id is not None]
        assert single == reference(loaded, ids)
        batch = [tok(p).input_ids for p in BATCH]
        assert run_together(engine, batch) == [reference(loaded, ids) for ids in batch]
    finally:
        engine.shutdown(drain=False, timeout=10)
    return engine


@pytest.mark.parametrize("model_type", MATRIX)
def test_engine_greedy_matches_generate(model_type, loaded_models):
    loaded = loaded_models(model_type)
    # The lean forward takes exactly the shapes it reproduces; the probe is only a second check.
    assert LeanForward.supports(loaded.model) == (model_type in LEAN)
    engine = check_engine(loaded)
    assert isinstance(engine.forward, LeanForward) == (model_type in LEAN)


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpu-kernels", "plain"])
@pytest.mark.parametrize("name", list(WINDOWED))
def test_lean_forward_sliding_window_matches_generate(name, cpu_kernels, loaded_models, monkeypatch):
    from llmquant.serve.forward import cpu_backend

    if not cpu_kernels:
        monkeypatch.setattr(cpu_backend, "available", lambda model: False)
    elif not cpu_backend.available(loaded_models(name).model):
        pytest.skip("no compiled CPU decode kernels on this machine")
    engine = check_engine(loaded_models(name))
    assert isinstance(engine.forward, LeanForward)
    assert type(engine.forward.steps) is (cpu_backend.CpuSteps if cpu_kernels else TorchSteps)
