"""Single-stream speed on CPU: llmquant's engine against transformers `generate()` and llama.cpp.

For the demo model as stored (bf16) and its W8A8 and W4A16 (group 64) folders, loaded in bf16
compute: batch-1 decode tokens/s and 512-token prefill tokens/s, for
- llmquant's engine (`serve.Engine`: the lean forward -- on a CPU with AVX-512 VNNI the compiled
  decode kernels and the C++ batch-1 layer loop, serve/forward/cpu_backend.py -- then with
  `lean_forward=False`, i.e. the transformers forward inside the same engine, to show what the
  lean forward adds; its quantized layers still use llmquant's kernels);
- transformers `generate()` on the same loaded model object (same quantized layers);
- llama.cpp (`llama-cpp-python`, in its own environment: benchmarks/setup_llamacpp.sh) on the
  demo model's own Q4_1 GGUF, the file our demo model is made from.
Decode: every run generates exactly DECODE_TOKENS tokens after a 32-token prompt (EOS
ignored); the rate is (tokens - 1) / (time of last token - time of first token), so prefill is
excluded. Prefill: one 512-token prompt, time to its first token. Runs alternate between the
contenders and each number is the median of --repeats runs, so a noisy moment hits all alike.

    bash benchmarks/setup_llamacpp.sh       # once: llama.cpp in /tmp/llamacpp-venv
    python benchmarks/speed.py              # ~10 min on 2 cores; a quiet machine, please

Writes benchmarks/results/speed.json and speed.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
DECODE_TOKENS = 128
PROMPT_TOKENS = 32
PREFILL_TOKENS = 512
LLAMACPP_PYTHON = "/tmp/llamacpp-venv/bin/python"
QUANTIZE = {"W8A8": dict(scheme="W8A8", num_samples=32, seq_len=256), "W4A16": dict(scheme="W4A16", group_size=64)}


def corpus(tokenizer) -> list[int]:
    from llmquant.data import evaluation_tokens

    return evaluation_tokens(tokenizer, max_tokens=PREFILL_TOKENS + PROMPT_TOKENS).tolist()


# ---- ours ---------------------------------------------------------------------------------

def engine_runs(engine, ids: list[int]) -> tuple[float, float]:
    """(decode tokens/s, prefill tokens/s) through the engine, one request at a time."""
    from llmquant.serve.sampling import SamplingParams

    times = [time.perf_counter()]
    for event in engine.generate(ids[:PROMPT_TOKENS], SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0,
                                                                     ignore_eos=True)):
        if event.token_id is not None:
            times.append(time.perf_counter())
    assert len(times) == DECODE_TOKENS + 1, len(times)
    decode = (DECODE_TOKENS - 1) / (times[-1] - times[1])
    start = time.perf_counter()
    for _ in engine.generate(ids[:PREFILL_TOKENS], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)):
        pass
    return decode, PREFILL_TOKENS / (time.perf_counter() - start)


def generate_runs(model, ids: list[int]) -> tuple[float, float]:
    """(decode tokens/s, prefill tokens/s) with transformers generate() / forward, batch 1."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):  # called once per generated token: its times, like a stream's
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    clock = Clock()
    prompt = torch.tensor([ids[:PROMPT_TOKENS]])
    with torch.inference_mode():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=DECODE_TOKENS,
                       min_new_tokens=DECODE_TOKENS, do_sample=False, stopping_criteria=StoppingCriteriaList([clock]),
                       pad_token_id=model.config.eos_token_id)
        decode = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])
        long = torch.tensor([ids[:PREFILL_TOKENS]])
        start = time.perf_counter()
        model(long, logits_to_keep=1)
        prefill = PREFILL_TOKENS / (time.perf_counter() - start)
    return decode, prefill


# ---- llama.cpp, in its own environment --------------------------------------------------------

LLAMACPP_CHILD = r"""
import json, sys, time
import llama_cpp
path, ids, decode_tokens, prompt_tokens, prefill_tokens, threads = sys.argv[1:7]
ids = json.loads(ids); decode_tokens, prompt_tokens, prefill_tokens, threads = map(int, (decode_tokens, prompt_tokens, prefill_tokens, threads))
llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
times = []
for i, token in enumerate(llm.generate(ids[:prompt_tokens], top_k=1, temp=0.0, reset=True)):
    times.append(time.perf_counter())
    if len(times) == decode_tokens:
        break
decode = (decode_tokens - 1) / (times[-1] - times[0])
llm.reset()
start = time.perf_counter()
llm.eval(ids[:prefill_tokens])
prefill = prefill_tokens / (time.perf_counter() - start)
print(json.dumps({"decode": decode, "prefill": prefill, "version": llama_cpp.__version__}))
"""


def llamacpp_runs(python: str, gguf: Path, ids: list[int]) -> tuple[float, float, str]:
    proc = subprocess.run([python, "-c", LLAMACPP_CHILD, str(gguf), json.dumps(ids), str(DECODE_TOKENS),
                           str(PROMPT_TOKENS), str(PREFILL_TOKENS), str(torch.get_num_threads())],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp run failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["decode"], out["prefill"], out["version"]


# ---- the run ------------------------------------------------------------------------------

def forward_path(engine) -> str:
    """Which forward the engine runs: the row label says it, so a refused fast path is visible."""
    steps = getattr(engine.forward, "steps", None)  # a lean forward's steps; transformers' has none
    if steps is None:
        return "lean forward refused by its probe"
    if getattr(steps, "stack", None) is not None:
        return "C++ decode loop"
    return engine.forward.name


def cpu_description() -> str:
    """The CPU model and the instruction sets that decide which kernels run."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    return f"{model} ({', '.join(f for f in wanted if f in flags) or 'no AVX'})"


LLAMACPP = "llama.cpp"


def measure_model(name: str, folder: Path, ids: list[int], repeats: int, llamacpp=None) -> list[dict]:
    """Rows for one model; `llamacpp` (a callable) joins the alternation, so each model's
    "vs llama.cpp" compares runs taken side by side (this machine's speed drifts over minutes)."""
    from llmquant import load_model
    from llmquant.serve.engine import Engine

    loaded = load_model(folder, dtype="bfloat16")
    lean = Engine(loaded, max_batch_size=1)
    plain = Engine(loaded, max_batch_size=1, lean_forward=False)
    contenders = {"llmquant engine": lambda: engine_runs(lean, ids),
                  "llmquant engine, transformers forward": lambda: engine_runs(plain, ids),
                  "transformers generate()": lambda: generate_runs(loaded.model, ids)}
    if llamacpp is not None:
        contenders[LLAMACPP] = llamacpp
    try:
        for key, run in contenders.items():  # warm-up: kernel layouts, allocator, caches
            if key != LLAMACPP:
                run()
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in contenders}
        for _ in range(repeats):
            for key, run in contenders.items():
                results[key].append(run())
    finally:
        lean.shutdown()
        plain.shutdown()
    rows = []
    for key, runs in results.items():
        label = key + (f" ({forward_path(lean)})" if key == "llmquant engine" else "")
        rows.append({"model": name, "runner": label, "decode_tok_s": statistics.median(r[0] for r in runs),
                     "prefill_tok_s": statistics.median(r[1] for r in runs), "runs": [r[:2] for r in runs]})
        print(f"{name:6s} {key:40s} decode {rows[-1]['decode_tok_s']:7.1f} tok/s, "
              f"prefill {rows[-1]['prefill_tok_s']:7.1f} tok/s", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["bf16", "W8A8", "W4A16"], choices=["bf16", "W8A8", "W4A16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--llamacpp-python", default=LLAMACPP_PYTHON,
                        help="python of llama.cpp's environment (benchmarks/setup_llamacpp.sh); '' to skip it")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    import llmquant
    from llmquant import quantize
    from llmquant.loading.demo import ensure_demo_model

    demo = ensure_demo_model()
    ids = corpus(AutoTokenizer.from_pretrained(demo))
    rows: list[dict] = []
    llamacpp, llamacpp_version = None, None
    if args.llamacpp_python:
        from llmquant.loading.demo import demo_gguf_file

        gguf = demo_gguf_file()
        llamacpp_version = llamacpp_runs(args.llamacpp_python, gguf, ids)[2]  # also its warm-up
        llamacpp = lambda: llamacpp_runs(args.llamacpp_python, gguf, ids)[:2]  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="llmquant-speed-") as work:
        for name in args.models:
            folder = demo
            if name in QUANTIZE:
                folder = Path(work) / name
                quantize(demo, output=folder, verify=False, progress=False, **QUANTIZE[name])
            rows += measure_model(name, folder, ids, args.repeats, llamacpp)
    if llamacpp is not None:  # all its runs, from every model's alternation
        runs = [run for r in rows if r["runner"] == LLAMACPP for run in r["runs"]]
        rows.append({"model": "Q4_1 GGUF", "runner": f"llama.cpp (llama-cpp-python {llamacpp_version})",
                     "decode_tok_s": statistics.median(r[0] for r in runs),
                     "prefill_tok_s": statistics.median(r[1] for r in runs), "runs": runs})
        print(f"llama.cpp Q4_1: decode {rows[-1]['decode_tok_s']:.1f} tok/s, prefill {rows[-1]['prefill_tok_s']:.1f}")
    import transformers

    meta = {"device": f"CPU {platform.machine()}, {cpu_description()}", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "llmquant": llmquant.__version__,
            "llama_cpp_python": llamacpp_version, "decode_tokens": DECODE_TOKENS, "prompt_tokens": PROMPT_TOKENS,
            "prefill_tokens": PREFILL_TOKENS, "repeats": args.repeats, "command": "python " + shlex.join(sys.argv),
            "date": time.strftime("%Y-%m-%d"), "compute_dtype": "bfloat16"}
    write(rows, meta)
    return 0


def write(rows: list[dict], meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    by_model: dict[str, float] = {r["model"]: r["decode_tok_s"] for r in rows if r["runner"] == "transformers generate()"}
    llama_by_model = {r["model"]: r["decode_tok_s"] for r in rows if r["runner"] == LLAMACPP}
    llama = next((r for r in rows if r["runner"].startswith("llama.cpp (")), None)
    lines = ["# Single-stream speed on CPU (demo model, SmolLM2-135M-Instruct)", "",
             f"{meta['device']}, {meta['threads']} threads; torch {meta['torch']}, transformers "
             f"{meta['transformers']}" + (f", llama-cpp-python {meta['llama_cpp_python']}" if llama else "") + ". "
             f"Batch 1. Decode: {meta['decode_tokens']} tokens after a {meta['prompt_tokens']}-token prompt, "
             "first token excluded. Prefill: one "
             f"{meta['prefill_tokens']}-token prompt. Medians of {meta['repeats']} alternating runs; bf16 compute. "
             "llama.cpp runs in each model's alternation; 'vs llama.cpp' divides by those runs' median.", "",
             "| model | runner | decode tok/s | vs generate() | vs llama.cpp | prefill tok/s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        base = by_model.get(r["model"])
        vs_gen = f"{r['decode_tok_s'] / base:.2f}x" if base and r["runner"] != LLAMACPP else "—"
        llama_decode = llama_by_model.get(r["model"], llama["decode_tok_s"] if llama else None)
        vs_llama = f"{r['decode_tok_s'] / llama_decode:.2f}x" if llama_decode else "—"
        runner = ("llama.cpp, Q4_1 GGUF (runs alternated with this model's)" if r["runner"] == LLAMACPP
                  else r["runner"] if r is not llama else r["runner"] + ", all runs")
        lines.append(f"| {r['model']} | {runner} | {r['decode_tok_s']:.1f} | {vs_gen} | {vs_llama} | "
                     f"{r['prefill_tok_s']:.0f} |")
    lines += ["", f"Command: `{meta['command']}` ({meta['date']}).", ""]
    (RESULTS / "speed.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
