"""Self-distillation of a quantized folder from a served original (`llmquant distill --self Q
--teacher-endpoint URL`): a real `llmquant serve` process over the tiny model is the teacher."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmquant
from llmquant.distill.self_api import self_distill
from llmquant.errors import InvalidConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # after llmquant: tests/ must not shadow it
from conftest import make_tiny_model_dir  # noqa: E402  (tests/conftest.py: tiny models)

TRAIN = dict(steps=24, tokens=32 * 64, seq_len=64, batch_size=4, lr=3e-3, top_k=16, held_out_tokens=1024)


def _held_out_kl(original, folder) -> float:
    """Mean KL(original || folder's model) per token on 1,024 held-out corpus tokens."""
    from llmquant.data import evaluation_tokens

    student = llmquant.load_model(folder, dtype="float32").model
    ids = evaluation_tokens(original.tokenizer, "builtin", max_tokens=1024)
    windows = ids[: ids.numel() // 128 * 128].reshape(-1, 128)
    with torch.no_grad():
        p = torch.log_softmax(original.model(windows, use_cache=False).logits.float(), -1)
        q = torch.log_softmax(student(windows, use_cache=False).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def peaked_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """The tiny Llama with a final norm 8x wider: its random outputs are peaked rather than
    near-uniform, so top-k log-probs carry most of the mass and 4-bit rounding moves them."""
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model_dir(tmp_path_factory.mktemp("peaked") / "tiny", tokenizer=tiny_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def teacher_url(start_server, peaked_dir) -> str:
    return start_server(peaked_dir, "--max-model-len", "256", "--served-model-name", "tiny").base_url + "/v1"


@pytest.fixture(scope="module")
def quantized(peaked_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("served-teacher") / "q"
    llmquant.quantize(peaked_dir, scheme="W4A16_ASYM", group_size=32, output=out, num_samples=8, seq_len=64,
                      verify_tokens=512, progress=False)
    return out


def test_a_served_original_teaches_its_quantized_copy(teacher_url, quantized, peaked_dir, tmp_path):
    served = self_distill(None, quantized, output=tmp_path / "sd", teacher_endpoint=teacher_url, progress=False,
                          **TRAIN)
    section = served.report
    assert section["teacher"] == f"tiny at {teacher_url}"  # the name the server's /v1/models gave
    assert section["config"]["block_steps"] == 0 and section["config"]["top_k"] == 16
    assert len(section["history"]) == TRAIN["steps"] and not section["block"]
    held = section["held_out"]
    # (A random tiny model's perplexity says little; what training did is measured as KL below.)
    assert held["perplexity_original"] is None and held["perplexity_after"] > 1 and held["perplexity_before"] > 1
    # The served teacher taught what the local original would: on text never trained on, the
    # student moved towards the original about as far as with the original loaded here.
    local = self_distill(peaked_dir, quantized, output=tmp_path / "sd-local", block_steps=0,
                         verify_tokens=0, progress=False, **TRAIN)
    assert local.report["teacher"] != section["teacher"]
    original = llmquant.load_model(peaked_dir, dtype="float32")
    before, after, after_local = (_held_out_kl(original, folder)
                                  for folder in (quantized, tmp_path / "sd", tmp_path / "sd-local"))
    assert after < 0.95 * before, (before, after)  # measured: 0.0817 -> 0.0724 (local original: 0.0712)
    assert after < before - 0.7 * (before - after_local), (before, after, after_local)
    # Not verified against the original (it is not here): the report keeps no stale verification.
    report = json.loads((tmp_path / "sd" / "quantization_report.json").read_text())
    assert "verification" not in report and served.verification is None
    assert "not verified against the original" in (tmp_path / "sd" / "quantization_report.md").read_text()
    config = json.loads((tmp_path / "sd" / "config.json").read_text())["quantization_config"]
    assert config == json.loads((quantized / "config.json").read_text())["quantization_config"]


def test_what_a_served_teacher_cannot_do_is_refused(tmp_path):
    url = "http://127.0.0.1:9/v1"  # never contacted: every case fails before
    cases = [(dict(block_steps=4), "block-wise phase matches the original's decoder-layer outputs"),
             (dict(loss="ce"), "trains without a teacher"),
             (dict(top_k=32), "at most 20 log-probs"),
             (dict(steps=0), "steps must be > 0")]
    for settings, message in cases:
        with pytest.raises(InvalidConfigError, match=message):
            self_distill(None, tmp_path / "q", output=tmp_path / "x", teacher_endpoint=url, **settings)
    with pytest.raises(InvalidConfigError, match="not both"):
        self_distill("some/original", tmp_path / "q", output=tmp_path / "x", teacher_endpoint=url)
    assert not (tmp_path / "x").exists()


def test_cli_takes_a_teacher_endpoint_with_self(teacher_url, quantized, tmp_path):
    cli = [sys.executable, "-m", "llmquant", "distill", "-q", "--self", str(quantized), "--teacher-endpoint",
           teacher_url, "--steps", "2", "--tokens", "256", "--seq-len", "64", "--top-k", "5",
           "-o", str(tmp_path / "sd")]
    run = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "(original served, not measured here)" in run.stdout
    report = json.loads((tmp_path / "sd" / "quantization_report.json").read_text())
    section = report["self_distill"]
    assert section["config"]["top_k"] == 5 and section["teacher"] == f"tiny at {teacher_url}"
