"""Streamed quantization (one decoder layer at a time from the files) writes the very checkpoint the
in-memory run writes, holds one layer at a time, resumes, and refuses what it cannot do."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llmquant import quantize
from llmquant.errors import CorruptCheckpointError, InvalidConfigError

SMALL = dict(num_samples=8, seq_len=64, progress=False)


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def _assert_same_checkpoint(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    ca, cb = (json.loads((f / "config.json").read_text()) for f in (a, b))
    assert ca == cb


@pytest.mark.parametrize("recipe", [
    dict(scheme="W4A16", group_size=32),
    dict(scheme="W4A16", group_size=32, gptq=True),
    dict(scheme="W8A8"),  # SmoothQuant + dynamic int8 activations
    dict(scheme="FP8"),  # static activation scales
    dict(scheme="W4A16_ASYM", group_size=32, awq=True),
    dict(scheme="W4A16", group_size=32, target_bits=5.0),  # mixed precision: its own pass over the layers
    dict(scheme="W8A16", gptq=True, ignore=[]),  # lm_head quantized too (outside the decoder stack)
], ids=["rtn", "gptq", "w8a8-smoothquant", "fp8-static", "awq", "mixed-precision", "lm-head"])
def test_streamed_checkpoint_equals_the_in_memory_one(tiny_model_dir, tmp_path, recipe):
    results = {}
    for stream in (False, True):
        results[stream] = quantize(tiny_model_dir, output=tmp_path / f"out-{stream}", stream=stream, **SMALL,
                                   **recipe)
    _assert_same_checkpoint(tmp_path / "out-False", tmp_path / "out-True")
    # Verification streams beside the layers and measures what the in-memory reload measures (which
    # keeps the original's log-probabilities in float16: that rounding is the tolerance).
    a, b = results[False].verification, results[True].verification
    assert b.tokens == a.tokens > 0
    assert b.kl_mean == pytest.approx(a.kl_mean, rel=2e-2, abs=2e-6)
    assert b.top1_agreement == pytest.approx(a.top1_agreement, abs=1e-3)
    report = json.loads((tmp_path / "out-True" / "quantization_report.json").read_text())
    assert report["verification"]["kl_mean"] == pytest.approx(b.kl_mean)
    if "target_bits" in recipe:  # the same sensitivities, to the last bit, so the same choice
        memory = json.loads((tmp_path / "out-False" / "quantization_report.json").read_text())
        assert report["mixed_precision"]["sensitivity"] == memory["mixed_precision"]["sensitivity"]
        assert 0 < len(report["mixed_precision"]["high_layers"]) < len(report["layers"])


def test_sharded_source_and_sharded_output(tiny_model_dir, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    for stream in (False, True):
        quantize(tmp_path / "sharded", output=tmp_path / f"out-{stream}", stream=stream, max_shard_size="150KB",
                 scheme="W4A16", group_size=32, gptq=True, **SMALL)
    out = tmp_path / "out-True"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = _tensors(out)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(p.stat().st_size < 150_000 + 20_000 for p in out.glob("*.safetensors"))
    _assert_same_checkpoint(tmp_path / "out-False", out)
    assert not list(tmp_path.glob(".out-True*")), "no partial folder left behind"


def test_one_decoder_layer_is_in_memory_at_a_time(tiny_model_dir, tmp_path, monkeypatch):
    from llmquant.loading.layer_stream import LayerStream

    most = {"layers": 0}
    original_load = LayerStream.load

    def load(self, prefix, keys=None):
        original_load(self, prefix, keys)
        layers = self.model.model.layers
        loaded = sum(any(not p.is_meta for p in layer.parameters()) for layer in layers)
        most["layers"] = max(most["layers"], loaded)
        most["embedding"] = most.get("embedding", False) or (
            loaded > 0 and not self.model.model.embed_tokens.weight.is_meta)

    monkeypatch.setattr(LayerStream, "load", load)
    result = quantize(tiny_model_dir, output=tmp_path / "out", stream=True, gptq=True, group_size=32, **SMALL)
    assert most == {"layers": 1, "embedding": False}
    assert all(p.is_meta for p in result.model.parameters())  # nothing is left loaded at the end


def test_an_interrupted_streamed_run_resumes_and_writes_the_same_checkpoint(tiny_model_dir, tmp_path, monkeypatch,
                                                                           capsys):
    from llmquant.quant.pipeline import resume

    args = dict(scheme="W4A16", group_size=32, gptq=True, stream=True, **SMALL)
    quantize(tiny_model_dir, output=tmp_path / "whole", **args)

    original_save = resume.StreamResume.save

    def save_then_stop(self, k, tensors, streams, handler):
        original_save(self, k, tensors, streams, handler)
        if k == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(resume.StreamResume, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        quantize(tiny_model_dir, output=tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "out.resume" / "state.json").read_text())["next_layer"] == 1
    monkeypatch.setattr(resume.StreamResume, "save", original_save)
    quantize(tiny_model_dir, output=tmp_path / "out", resume=True, **{**args, "progress": True})
    assert "resuming at layer 1 of 2" in capsys.readouterr().err
    _assert_same_checkpoint(tmp_path / "whole", tmp_path / "out")
    assert not (tmp_path / "out.resume").exists()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gemma2", "phi3", "deepseek_v3"])
def test_architectures_stream_to_the_same_checkpoint(architecture_dir, tmp_path, model_type):
    src = architecture_dir(model_type)
    for stream in (False, True):
        quantize(src, output=tmp_path / f"out-{stream}", stream=stream, scheme="W4A16", group_size=16, gptq=True,
                 num_samples=4, seq_len=32, progress=False, verify=False)
    _assert_same_checkpoint(tmp_path / "out-False", tmp_path / "out-True")


def test_the_plan_shows_both_peaks_and_small_models_load_whole(tiny_model_dir, tmp_path, capsys):
    quantize(tiny_model_dir, output=tmp_path / "out", scheme="W4A16", group_size=32, num_samples=4, seq_len=32,
             verify=False)
    err = capsys.readouterr().err
    assert "memory plan: whole model in memory" in err and "streamed one layer at a time" in err
    assert "streaming:" not in err  # it fits: loaded whole, as before


def test_a_model_that_would_not_fit_streams_by_default(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from llmquant.quant.pipeline import memory_plan

    # A machine with 1 MB free: the whole tiny model (and its calibration) would not fit.
    monkeypatch.setattr(memory_plan, "available_memory", lambda device: 1_000_000)
    quantize(tiny_model_dir, output=tmp_path / "out", scheme="W4A16", group_size=32, num_samples=4, seq_len=32,
             verify=False)
    err = " ".join(capsys.readouterr().err.split())
    assert "0.00 GiB available" in err and "streaming: reading one decoder layer at a time" in err
    assert "--no-stream loads it anyway" in err
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_planner_peaks_for_a_70b_model():
    from llmquant.quant.pipeline.memory_plan import estimate_peaks

    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=8192, intermediate_size=28672,
                  num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                  tie_word_embeddings=False)
    peaks = estimate_peaks(config, 128, 2048, gptq=True)
    params = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192) + 2 * 128256 * 8192 + 8192
    assert peaks.checkpoint_bytes == 2 * params  # 70.6B parameters in bf16
    assert peaks.largest_layer_bytes == peaks.checkpoint_bytes // 80 - (2 * 128256 * 8192 + 8192) * 2 // 80
    assert peaks.in_memory_bytes > peaks.checkpoint_bytes
    assert peaks.streamed_bytes < 0.25 * peaks.checkpoint_bytes
    assert peaks.streamed_bytes == peaks.largest_layer_bytes + peaks.calibration_bytes  # one layer at a time


def test_refusals(tiny_model_dir, tmp_path):
    with pytest.raises(InvalidConfigError, match="--output"):
        quantize(tiny_model_dir, stream=True, **SMALL)
    with pytest.raises(InvalidConfigError, match="max-shard-size"):
        quantize(tiny_model_dir, output=tmp_path / "o", max_shard_size="lots", **SMALL)
    assert not (tmp_path / "o").exists()


def test_a_missing_tensor_is_named_before_any_work(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match="model.layers.1.mlp.down_proj.weight"):
        quantize(broken, output=tmp_path / "o", stream=True, **SMALL)
    assert not (tmp_path / "o").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_layers_stream_to_the_gpu(tiny_model_dir, tmp_path):
    result = quantize(tiny_model_dir, output=tmp_path / "out", stream=True, device="cuda", gptq=True, group_size=32,
                      **SMALL)
    assert result.verification.top1_agreement > 0.5
    assert all(p.is_meta for p in result.model.parameters())
