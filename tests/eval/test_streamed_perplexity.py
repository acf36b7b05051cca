"""Streamed perplexity (the model read one decoder layer at a time) against the in-memory run."""

from __future__ import annotations

import json

import pytest
import torch

from llmquant.errors import InvalidConfigError
from llmquant.eval import perplexity
from llmquant.loading import load_model

# Measured bit-identical on CPU (the same computation in the same batches); the tolerance leaves
# room for a device whose kernels pick another path for the shorter output-head input.
REL = 1e-6


def assert_same(streamed, in_memory):
    assert streamed.method["streamed"] is True and in_memory.method["streamed"] is False
    assert streamed.num_tokens_scored == in_memory.num_tokens_scored
    assert streamed.nll_per_token == pytest.approx(in_memory.nll_per_token, rel=REL)
    assert streamed.per_window == pytest.approx(in_memory.per_window, rel=REL)
    assert streamed.bits_per_byte == pytest.approx(in_memory.bits_per_byte, rel=REL)
    assert {k: v for k, v in streamed.method.items() if k != "streamed"} == \
        {k: v for k, v in in_memory.method.items() if k != "streamed"}


# (128, 48, 3): overlapping windows, batches of three, a shorter last window in a batch of its own.
@pytest.mark.parametrize("options", [dict(window=128, stride=48, batch_size=3, dtype="float32"),
                                     dict(window=100, batch_size=2)])
def test_streamed_equals_in_memory(tiny_model_dir, one_thread, options):
    in_memory = perplexity(tiny_model_dir, max_tokens=700, progress=False, **options)
    streamed = perplexity(tiny_model_dir, max_tokens=700, stream=True, progress=False, **options)
    assert_same(streamed, in_memory)


def test_streamed_quantized_folder_equals_in_memory(tiny_model_dir, tmp_path, one_thread):
    import llmquant

    folder = tmp_path / "w4a16"
    llmquant.quantize(tiny_model_dir, output=folder, progress=False, verify=False)
    in_memory = perplexity(folder, max_tokens=600, window=128, batch_size=2, progress=False)
    streamed = perplexity(folder, max_tokens=600, window=128, batch_size=2, stream=True, progress=False)
    assert_same(streamed, in_memory)


def test_streamed_sharded_folder_equals_in_memory(tiny_model_dir, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(sharded, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 2  # each layer spread over files
    in_memory = perplexity(tiny_model_dir, max_tokens=600, window=128, progress=False)
    streamed = perplexity(sharded, max_tokens=600, window=128, stream=True, progress=False)
    assert_same(streamed, in_memory)


def test_one_decoder_layer_in_memory_at_a_time(tiny_model_dir, one_thread):
    from llmquant.arch.layers import find_decoder_layers

    loaded = load_model(tiny_model_dir, dtype="float32", stream=True)
    model = loaded.model
    _, layers = find_decoder_layers(model)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    runs = []

    def on_meta(module):
        return all(p.is_meta for p in module.parameters())

    def check(index):
        def hook(module, args):
            loaded_layers = [k for k, layer in enumerate(layers) if not on_meta(layer)]
            runs.append((index, loaded_layers, on_meta(embedding), on_meta(head)))
        return hook

    handles = [layer.register_forward_pre_hook(check(k)) for k, layer in enumerate(layers)]
    try:
        result = perplexity(loaded, max_tokens=600, window=128, batch_size=2, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert result.method["streamed"] is True  # a streamed LoadedModel is always scored streamed
    batches = 3  # 600 tokens in 128-token windows: 5 windows, batches of 2
    captures = [r for r in runs if r[1] == []]  # the model run up to layer 0 to keep its inputs
    assert [(r[0], r[2]) for r in captures] == [(0, False)] * batches  # the embedding read for it
    layer_runs = [r for r in runs if r[1] != []]
    assert [r[0] for r in layer_runs] == [k for k in range(len(layers)) for _ in range(batches)]
    for index, loaded_layers, embedding_meta, head_meta in layer_runs:
        assert loaded_layers == [index]  # the running layer and no other
        assert embedding_meta and head_meta
    assert all(p.is_meta for p in model.parameters())  # everything let go at the end
    reference = perplexity(tiny_model_dir, max_tokens=600, window=128, batch_size=2, dtype="float32", progress=False)
    assert result.nll_per_token == pytest.approx(reference.nll_per_token, rel=REL)


def test_cli_stream_prints_the_same_perplexity(tiny_model_dir, capsys, one_thread):
    from llmquant.cli import main

    args = ["eval", "perplexity", str(tiny_model_dir), "--max-tokens", "600", "--window", "128"]
    assert main(args) == 0
    in_memory = capsys.readouterr().out
    assert main([*args, "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert streamed.splitlines()[0] == in_memory.splitlines()[0]  # "perplexity 517.7259 (...)"
    assert "read one decoder layer at a time" in streamed and "decoder layer" not in in_memory
    assert main([*args, "--stream", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"]["streamed"] is True


def test_cli_stream_refuses_pickle_and_gguf(tiny_model_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    from llmquant.cli import main

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    # With --allow-pickle too: the refusal must name the streamed run's limit, not ask for that flag.
    for extra in ([], ["--allow-pickle"]):
        assert main(["eval", "perplexity", str(pickled), "--max-tokens", "100", "--stream", *extra]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "pickle" in err and "reads safetensors only" in err and "without --stream" in err
        assert "Traceback" not in err

    gguf = tmp_path / "model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF")  # refused before it is read
    assert main(["eval", "perplexity", str(gguf), "--max-tokens", "100", "--stream"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "GGUF" in err and "without --stream" in err


def test_a_model_already_in_memory_cannot_stream(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = load_model(tiny_model_dir, dtype="float32")
    pair = (AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir))
    for model in (loaded, pair):
        with pytest.raises(InvalidConfigError, match="needs the model's source"):
            perplexity(model, max_tokens=100, stream=True, progress=False)
