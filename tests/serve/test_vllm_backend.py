"""`--backend vllm`: option mapping, and a clear refusal where vLLM is not installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmquant.serve.vllm_backend import VLLM_ENTRYPOINT, vllm_available, vllm_command


def test_options_map_to_vllm_flags():
    argv = vllm_command("/ckpt", ["--enforce-eager"], host="0.0.0.0", port=9000, served_model_name="m",
                        max_model_len=4096, max_batch_size=64, dtype="bfloat16", tensor_parallel_size=2,
                        gpu_memory_utilization=0.8, trust_remote_code=True, revision=None, api_key=None)
    assert argv[:5] == [sys.executable, "-m", VLLM_ENTRYPOINT, "--model", "/ckpt"]
    pairs = dict(zip(argv[5::2], argv[6::2]))
    assert pairs["--host"] == "0.0.0.0" and pairs["--port"] == "9000" and pairs["--served-model-name"] == "m"
    assert pairs["--max-model-len"] == "4096" and pairs["--max-num-seqs"] == "64"
    assert pairs["--dtype"] == "bfloat16" and pairs["--tensor-parallel-size"] == "2"
    assert pairs["--gpu-memory-utilization"] == "0.8"
    assert "--trust-remote-code" in argv and argv[-1] == "--enforce-eager"
    assert "--revision" not in argv and "--api-key" not in argv


def test_defaults_are_left_to_vllm():
    argv = vllm_command("org/model", dtype="auto")
    assert argv == [sys.executable, "-m", VLLM_ENTRYPOINT, "--model", "org/model"]
    with pytest.raises(TypeError, match="no flag"):
        vllm_command("m", max_waiting=3)


@pytest.mark.skipif(vllm_available(), reason="vllm is installed here")
def test_missing_vllm_is_a_clear_error(tiny_model_dir):
    result = subprocess.run([sys.executable, "-m", "llmquant", "serve", str(tiny_model_dir), "--backend", "vllm",
                             "--tensor-parallel-size", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "pip install vllm" in result.stderr and "Traceback" not in result.stderr


def test_vllm_only_flags_refused_on_our_engine(tiny_model_dir):
    result = subprocess.run([sys.executable, "-m", "llmquant", "serve", str(tiny_model_dir),
                             "--tensor-parallel-size", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--tensor-parallel-size only apply with --backend vllm" in result.stderr
