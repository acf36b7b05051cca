"""`--backend vllm`: hand the same checkpoint and options to vLLM's OpenAI server.

vLLM reads our compressed-tensors folders natively, so this adapter only maps options and
replaces the current process with `python -m vllm.entrypoints.openai.api_server ...` (signals,
logs and exit code are then vLLM's own). vLLM needs Linux with a CUDA GPU; where it is not
installed the command stops with what to install instead of a traceback.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from llmquant.errors import MissingDependencyError

VLLM_ENTRYPOINT = "vllm.entrypoints.openai.api_server"

# Our option name -> vLLM's flag. Options left at None are not passed (vLLM's default applies).
FLAG_MAP = {
    "host": "--host",
    "port": "--port",
    "api_key": "--api-key",
    "served_model_name": "--served-model-name",
    "max_model_len": "--max-model-len",
    "max_batch_size": "--max-num-seqs",
    "dtype": "--dtype",
    "revision": "--revision",
    "tensor_parallel_size": "--tensor-parallel-size",
    "pipeline_parallel_size": "--pipeline-parallel-size",
    "gpu_memory_utilization": "--gpu-memory-utilization",
}
BOOLEAN_FLAGS = {"trust_remote_code": "--trust-remote-code"}


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_command(model: str, extra_args: list[str] | tuple[str, ...] = (), **options) -> list[str]:
    """The argv that serves `model` with vLLM; `options` use llmquant's names (see FLAG_MAP)."""
    unknown = set(options) - set(FLAG_MAP) - set(BOOLEAN_FLAGS)
    if unknown:
        raise TypeError(f"options vLLM has no flag for: {sorted(unknown)}")
    argv = [sys.executable, "-m", VLLM_ENTRYPOINT, "--model", str(model)]
    for name, flag in FLAG_MAP.items():
        value = options.get(name)
        if value is None or (name == "dtype" and value == "auto"):
            continue
        argv += [flag, str(value)]
    argv += [flag for name, flag in BOOLEAN_FLAGS.items() if options.get(name)]
    return argv + list(extra_args)


def serve_with_vllm(model: str, extra_args: list[str] | tuple[str, ...] = (), **options) -> None:
    """Replace this process with vLLM's server; returns only by raising."""
    if not vllm_available():
        raise MissingDependencyError(
            "--backend vllm needs the vllm package, which is not installed in this environment. vLLM runs on Linux "
            "with a CUDA GPU: `pip install vllm`, then run the same command again. Without a GPU, leave out "
            "--backend to serve with llmquant's own engine (CPU or CUDA).")
    argv = vllm_command(model, extra_args, **options)
    # The API key travels in the environment vLLM also reads, not on the command line where
    # `ps` would show it to every user of the machine.
    env = dict(os.environ)
    if options.get("api_key"):
        i = argv.index("--api-key")
        env["VLLM_API_KEY"] = argv[i + 1]
        del argv[i:i + 2]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
