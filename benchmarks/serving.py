"""Serving throughput: `llmquant serve` against vLLM's CPU server and llama.cpp's server, same run,
same prompts, same client; plus transformers `generate()` on the model object llmquant loads.

For each model (the demo model in bf16, its W4A16 group-64 folder, its W8A8 folder), one server at
a time is started on 127.0.0.1, measured at each concurrency level (1, 8, 32 streaming clients) and
stopped, its whole process group, before the next starts:

  ours      python -m llmquant serve DIR --served-model-name m --max-batch-size 32
  vllm      VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_INT4_W4A8=0 VLLM_PYTHON -m vllm.entrypoints.openai.api_server
              --model DIR --served-model-name m --dtype bfloat16 --max-model-len 2048 --max-num-seqs 32
            (the same folders; INT4_W4A8=0 keeps activations in bf16, as ours; vLLM's other defaults,
            its OpenMP thread binding included, are left alone and recorded)
  llamacpp  LLAMACPP_PYTHON -m llama_cpp.server --model F.gguf --n_threads T --n_threads_batch T
              --n_ctx 4096 --interrupt_requests False --logits_all False
            (T = the CPUs this process may use; GGUFs exported from the demo model by `llmquant export`:
            bf16 -> F16 (faster than BF16 in llama.cpp here), W4A16 -> Q4_0 --method rtn,
            W8A8 -> Q8_0 --method rtn)
  generate  transformers generate() in this process, batches of 1, 8, 32 (--no-generate-baseline: off)

Prompts are 128-token slices of the held-out corpus sent as TEXT (llama.cpp's server takes no token
ids); every level of every server gets fresh prompts (the same ones for every server), so prefix
caches never skip a prefill. Each request asks for exactly 64 tokens, greedy: `ignore_eos` for ours
and vLLM, a logit_bias forbidding llama.cpp's end-of-generation tokens for llama.cpp; completion
tokens are checked (usage, or the stream for llama.cpp, which reports no usage when streaming) and a
request that errs or returns fewer tokens counts as failed. Per level: aggregate output tok/s,
TTFT p50/p99, TPOT p50/p99 ((end - first token) / (tokens - 1) per request), failed requests.

    python benchmarks/serving.py                        # everything; 30-45 min on 2 CPU cores
    python benchmarks/serving.py --models W4A16 --engines ours vllm
    python benchmarks/serving.py --models bf16 --concurrency 1 8 --requests 8 --cpus 1   # quick check

Rival environments: bash benchmarks/setup_vllm_cpu.sh (--vllm-python, default $LLMQUANT_VLLM_PYTHON or
/tmp/vllm-cpu-venv/bin/python) and bash benchmarks/setup_llamacpp.sh (--llamacpp-python, default
/tmp/llamacpp-venv/bin/python); a missing one skips its rows with the reason. Quantized folders and
GGUF files are cached in --work (delete it to rebuild them); server logs go there too.
Writes benchmarks/results/serving.json and serving.md; rows of (model, engine) pairs this run did
not measure are kept from the existing JSON, each naming the command, date and commit that made it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_servers as srv  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROMPT_TOKENS = 128
OUTPUT_TOKENS = 64
ORDER = ("bf16", "W4A16", "W8A8")
QUANTIZE = {"W4A16": dict(scheme="W4A16", group_size=64), "W8A8": dict(scheme="W8A8", num_samples=32, seq_len=256)}
GGUF = {"bf16": ("F16", None), "W4A16": ("Q4_0", "rtn"), "W8A8": ("Q8_0", "rtn")}  # llama.cpp's file per model
ENGINES = {"ours": "llmquant serve", "vllm": "vLLM CPU", "llamacpp": "llama.cpp server",
           "generate": "transformers generate()"}
SERVERS = ("ours", "vllm", "llamacpp")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def make_prompts(tokenizer, n: int) -> list[tuple[list[int], str]]:
    """n prompts of PROMPT_TOKENS tokens each (ids, and their text), consecutive slices of the held-out split."""
    from llmquant.data import evaluation_tokens

    ids = evaluation_tokens(tokenizer, max_tokens=n * PROMPT_TOKENS)
    slices = [ids[i * PROMPT_TOKENS:(i + 1) * PROMPT_TOKENS].tolist() for i in range(n)]
    return [(s, tokenizer.decode(s)) for s in slices]


def plan_levels(levels: list[int], requests: int | None) -> list[tuple[int, int, list[int]]]:
    """(concurrency, warm-up prompt index, measured prompt indices) per level; no prompt is used twice."""
    plan, next_index = [], 0
    for c in levels:
        n = max(requests or max(2 * c, 8), c)
        plan.append((c, next_index, list(range(next_index + 1, next_index + 1 + n))))
        next_index += n + 1
    return plan


# ---- the client -------------------------------------------------------------------------------

async def one_request(client, text: str, extra_body: dict) -> dict:
    """One streamed completion: time to first token, end-to-end seconds, output and prompt tokens."""
    t0 = time.perf_counter()
    first = tokens = prompt_tokens = finish = None
    chunks = 0
    try:
        stream = await client.completions.create(model="m", prompt=text, max_tokens=OUTPUT_TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=extra_body)
        async for chunk in stream:
            if chunk.choices:
                if first is None:
                    first = time.perf_counter() - t0
                choice = chunk.choices[0]
                chunks += bool(choice.text)
                finish = choice.finish_reason or finish
            if chunk.usage:
                tokens, prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
    except Exception as e:  # counted as a failed request, never ends the level
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    e2e = time.perf_counter() - t0
    counted = "usage"
    if tokens is None:  # llama.cpp's server: no usage when streaming; it stops at max_tokens with "length"
        counted = "stream"
        tokens = OUTPUT_TOKENS if finish == "length" and chunks <= OUTPUT_TOKENS else chunks
    return {"ttft": first, "e2e": e2e, "tokens": tokens, "prompt_tokens": prompt_tokens, "finish": finish,
            "counted": counted}


async def load_test(url: str, warm: str, texts: list[str], concurrency: int, extra_body: dict) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)
    warmup = await one_request(client, warm, extra_body)  # kernels prepared, caches allocated
    queue = list(texts)
    results = []

    async def worker():
        while queue:
            results.append(await one_request(client, queue.pop(0), extra_body))

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t
    await client.close()  # before asyncio.run closes the loop under its connections
    return summarize(results, concurrency, wall, warmup)


def summarize(results: list[dict], concurrency: int, wall: float, warmup: dict | None = None) -> dict:
    good = [r for r in results if "error" not in r and r["tokens"] == OUTPUT_TOKENS and r["ttft"] is not None]
    short = [r for r in results if "error" not in r and r not in good]
    errors = list(dict.fromkeys(r["error"] for r in results if "error" in r))
    errors += [f"{r['tokens']} tokens instead of {OUTPUT_TOKENS} (finish_reason {r['finish']})" for r in short[:3]]
    if warmup and "error" in warmup:
        errors.append("warm-up request: " + warmup["error"])
    tokens = sum(r["tokens"] for r in results if "error" not in r)
    ttft = [r["ttft"] for r in good]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in good]
    prompt_tokens = [r["prompt_tokens"] for r in results if r.get("prompt_tokens")]
    row = {"concurrency": concurrency, "requests": len(results), "failed": len(results) - len(good),
           "short_outputs": len(short), "output_tokens": tokens, "seconds": wall,
           "output_tokens_per_s": tokens / wall if wall else 0.0,
           "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
           "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
           "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else None,
           "tokens_counted_from": sorted({r["counted"] for r in results if "counted" in r})}
    if errors:
        row["errors"] = errors[:6]
    return row


# ---- transformers generate() baseline -------------------------------------------------------

def generate_baseline(loaded, warm: list[int], chosen: list[list[int]], batch: int) -> dict:
    model = loaded.model

    def run(group):
        ids = torch.tensor(group)  # equal lengths: no padding needed, same work as the servers
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUTPUT_TOKENS,
                                 min_new_tokens=OUTPUT_TOKENS, do_sample=False, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    run([warm])
    t = time.perf_counter()
    tokens = sum(run(chosen[i:i + batch]) for i in range(0, len(chosen), batch))
    wall = time.perf_counter() - t
    return {"batch": batch, "requests": len(chosen), "output_tokens": tokens, "seconds": wall,
            "output_tokens_per_s": tokens / wall}


# ---- models and GGUF files, cached in --work ----------------------------------------------------

def model_dirs(names: list[str], work: Path) -> dict[str, Path]:
    from llmquant import quantize
    from llmquant.loading.demo import ensure_demo_model

    demo = ensure_demo_model()
    dirs = {}
    for name in names:
        if name == "bf16":
            dirs[name] = demo
            continue
        out = work / "models" / name
        stamp = json.dumps(QUANTIZE[name], sort_keys=True)
        if (out / ".benchmark-stamp").exists() and (out / ".benchmark-stamp").read_text() == stamp:
            print(f"{name}: using {out}", flush=True)
        else:
            print(f"quantizing the demo model to {name} in {out}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            quantize(demo, output=out, verify=False, progress=False, **QUANTIZE[name])
            (out / ".benchmark-stamp").write_text(stamp)
        dirs[name] = out
    return dirs


def gguf_file(name: str, work: Path) -> Path:
    kind, method = GGUF[name]
    out = work / "gguf" / f"demo-{kind}{'-' + method if method else ''}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial.gguf")
        print(f"exporting the demo model as {out.name}", flush=True)
        command = [sys.executable, "-m", "llmquant", "export", "--format", "gguf", "--type", kind,
                   "--output", str(tmp), "--no-verify", "--overwrite", "-q"] + (["--method", method] if method else [])
        subprocess.run(command, check=True)
        tmp.rename(out)
    return out


# ---- results ----------------------------------------------------------------------------------

def _ms(value) -> str:
    return "" if value is None else f"{value * 1000:.0f}"


def add_ratios(rows: list[dict]) -> None:
    """On our rows: our output tok/s over vLLM CPU's and llama.cpp's at the same model and level."""
    by = {(r["model"], r["engine"], r.get("concurrency")): r for r in rows if "skipped" not in r}
    for r in rows:
        for key in ("vs_vllm_cpu", "vs_llamacpp"):
            r.pop(key, None)
        if r["engine"] != ENGINES["ours"] or "skipped" in r:
            continue
        for key, engine in (("vs_vllm_cpu", "vllm"), ("vs_llamacpp", "llamacpp")):
            other = by.get((r["model"], ENGINES[engine], r["concurrency"]))
            if other and other["output_tokens_per_s"]:
                r[key] = r["output_tokens_per_s"] / other["output_tokens_per_s"]


def write(rows: list[dict], meta: dict, results: Path = RESULTS) -> None:
    """Write this run's rows; (model, engine) pairs this run did not try are kept from the file."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / "serving.json"
    stamp = {"command": meta["command"], "date": meta["date"], "commit": meta["commit"], "threads": meta["threads"]}
    rows = [{**stamp, **r} for r in rows]
    # A pair this run tried replaces the file's rows of that pair; one it could not try (no environment)
    # keeps the file's measured rows, if any, instead of a "skipped" line.
    tried = {(r["model"], r["engine"]) for r in rows if r.get("attempted", True)}
    if path.exists():
        old = [r for r in json.loads(path.read_text())["rows"] if (r["model"], r["engine"]) not in tried]
        kept = {(r["model"], r["engine"]) for r in old if "skipped" not in r}
        rows = [r for r in rows if (r["model"], r["engine"]) not in kept] + \
            [r for r in old if (r["model"], r["engine"]) in kept or (r["model"], r["engine"]) not in
             {(x["model"], x["engine"]) for x in rows}]
    engine_order = list(ENGINES.values())
    rows.sort(key=lambda r: (ORDER.index(r["model"]) if r["model"] in ORDER else len(ORDER),
                             engine_order.index(r["engine"]) if r["engine"] in engine_order else 9,
                             r.get("concurrency", r.get("batch", 0))))
    add_ratios(rows)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))

    measured = [r for r in rows if "skipped" not in r]
    flags = ", ".join(meta["cpu_flags"]) or "none of " + ", ".join(srv.CPU_FLAGS_OF_NOTE)
    lines = [f"# Serving throughput on the demo model ({meta['cpu']}, {meta['cpus']} CPUs)", "",
             f"CPU flags of note: {flags}. Prompts of {PROMPT_TOKENS} tokens of held-out text (sent as text, "
             f"fresh prompts for every level), {OUTPUT_TOKENS} output tokens each, greedy; streaming "
             "clients (openai AsyncOpenAI), one server at a time. TPOT = (end - first token) / (tokens - 1) "
             "per request. Failed = errors and outputs short of "
             f"{OUTPUT_TOKENS} tokens. Ratios: our output tok/s over the rival's at the same model and level.", "",
             "| model | engine | streams / batch | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | "
             "TPOT p99 ms | failed / requests | ours / vLLM CPU | ours / llama.cpp |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in measured:
        ratios = " | ".join(f"{r[k]:.2f}x" if k in r else "" for k in ("vs_vllm_cpu", "vs_llamacpp"))
        failed = f"{r['failed']} / {r['requests']}" if "failed" in r else f"- / {r['requests']}"
        engine = r["engine"] + (f" ({r['gguf_type']})" if r.get("gguf_type") else "")
        lines.append(f"| {r['model']} | {engine} | {r.get('concurrency', r.get('batch'))} | "
                     f"{r['output_tokens_per_s']:.1f} | {_ms(r.get('ttft_p50_s'))} | {_ms(r.get('ttft_p99_s'))} | "
                     f"{_ms(r.get('tpot_p50_s'))} | {_ms(r.get('tpot_p99_s'))} | {failed} | {ratios} |")
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        lines += ["", "Not measured:"] + [f"- {r['model']}, {r['engine']}: {r['skipped']}" for r in skipped]
    errors = [(r, e) for r in measured for e in r.get("errors", [])]
    if errors:
        lines += ["", "Errors:"] + [f"- {r['model']}, {r['engine']}, {r.get('concurrency')}: {e}" for r, e in errors]
    versions = {e: ", ".join(sorted({r["engine_version"] for r in measured if r["engine"] in labels
                                     and r.get("engine_version")})) or "-"
                for e, labels in (("vllm", [ENGINES["vllm"]]), ("llamacpp", [ENGINES["llamacpp"]]),
                                  ("torch", [ENGINES["ours"], ENGINES["generate"]]))}
    threads = ", ".join(str(t) for t in sorted({r["threads"] for r in measured if r.get("threads")})) or "?"
    lines += ["", f"Versions: vLLM {versions['vllm']}, llama-cpp-python {versions['llamacpp']}, torch "
              f"{versions['torch']} (llmquant serve, generate()). CPUs the benchmark used: {threads} "
              f"(of {meta['cpus']}; see each run's --cpus).",
              "vLLM CPU: its OpenAI server, " + " ".join(f"{k}={v}" for k, v in srv.VLLM_ENV.items()) +
              " (INT4 weights with bf16 activations, the same numerics as ours), --dtype bfloat16 "
              "--max-model-len 2048 --max-num-seqs 32, its other defaults (OpenMP binding: see the JSON).",
              "llama.cpp server: llama-cpp-python's `llama_cpp.server`, --interrupt_requests False (by default "
              "a new request cuts off the one streaming), --logits_all False (no prompt logits), GGUF files by `llmquant export` from the demo model "
              "(bf16 -> F16, W4A16 -> Q4_0 round-to-nearest, W8A8 -> Q8_0), end-of-generation tokens forbidden "
              "by logit_bias; it answers one request at a time.", ""]
    for command in dict.fromkeys(r["command"] for r in rows):
        what = ", ".join(dict.fromkeys(f"{r['model']} {r['engine']}" for r in rows if r["command"] == command))
        runs = ", ".join(sorted({f"{r['date']} at {(r.get('commit') or '?')[:12]}"
                                 f"{' + uncommitted changes' if 'uncommitted' in (r.get('commit') or '') else ''}"
                                 for r in rows if r["command"] == command}))
        lines.append(f"- {what}: `{command}` ({runs})")
    lines.append("")
    (results / "serving.md").write_text("\n".join(lines))


# ---- main -------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(ORDER), choices=ORDER,
                        help="models to measure (default: all); rows of the others stay as they are")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES),
                        help="which rows to run (default: all); rows of the others stay as they are")
    parser.add_argument("--no-generate-baseline", action="store_true", help="skip transformers generate()")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32], help="levels (default 1 8 32)")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per level (default 2 x concurrency, at least 8; never below the concurrency)")
    parser.add_argument("--vllm-python", default=os.environ.get("LLMQUANT_VLLM_PYTHON", "/tmp/vllm-cpu-venv/bin/python"),
                        help=f"python of vLLM's CPU environment ({srv.VLLM_SETUP}; default $LLMQUANT_VLLM_PYTHON "
                             "or /tmp/vllm-cpu-venv/bin/python)")
    parser.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for vLLM's server (repeatable), e.g. VLLM_CPU_OMP_THREADS_BIND=0-1")
    parser.add_argument("--llamacpp-python", default="/tmp/llamacpp-venv/bin/python",
                        help=f"python of llama-cpp-python's environment ({srv.LLAMACPP_SETUP}; default "
                             "/tmp/llamacpp-venv/bin/python)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for quantized models, GGUF files and server logs, kept between runs "
                             "(default $LLMQUANT_HOME/serving-benchmark, i.e. ~/.cache/llmquant/serving-benchmark)")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder of serving.json and serving.md (default benchmarks/results)")
    parser.add_argument("--startup-timeout", type=float, default=900,
                        help="seconds a server may take to answer (default 900: vLLM takes minutes on 2 cores)")
    parser.add_argument("--cpus", default=None,
                        help="pin this process and every server to these CPUs, e.g. '1' or '0-1' (development on a "
                             "shared machine; threads = their number; vLLM's OpenMP bound there with none reserved)")
    return parser.parse_args(argv)


def parse_cpus(text: str) -> list[int]:
    cpus = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus += list(range(int(lo), int(hi or lo) + 1))
    return cpus


def main(argv=None) -> int:
    commit = srv.git_commit()  # before anything runs
    args = parse_args(argv)
    cpus = parse_cpus(args.cpus) if args.cpus else None
    if cpus:
        os.sched_setaffinity(0, cpus)  # inherited by every server started below
        torch.set_num_threads(len(cpus))
    threads = len(os.sched_getaffinity(0))
    engines = [e for e in ENGINES if e in args.engines and not (e == "generate" and args.no_generate_baseline)]

    from llmquant import load_model
    from llmquant.loading.demo import ensure_demo_model, llmquant_home
    from transformers import AutoTokenizer

    work = (args.work or llmquant_home() / "serving-benchmark").resolve()
    work.mkdir(parents=True, exist_ok=True)
    versions = {"torch": torch.__version__}
    unavailable = {}
    for engine, python in (("vllm", args.vllm_python), ("llamacpp", args.llamacpp_python)):
        if engine in engines:
            version, why = srv.check_python(python, engine)
            versions["vllm" if engine == "vllm" else "llama_cpp_python"] = version
            if version is None:
                unavailable[engine] = why
                print(f"{ENGINES[engine]} rows skipped: {why}", file=sys.stderr, flush=True)
    engine_version = {"ours": torch.__version__, "vllm": versions.get("vllm"),
                      "llamacpp": versions.get("llama_cpp_python")}
    vllm_env = dict(kv.split("=", 1) for kv in args.vllm_env)
    meta = {**srv.cpu_facts(), "threads": threads, "pinned_cpus": args.cpus, "commit": commit,
            "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d %H:%M"), "versions": versions,
            "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS, "concurrency": args.concurrency,
            "python": {"vllm": args.vllm_python, "llamacpp": args.llamacpp_python},
            "vllm_env": {**srv.VLLM_ENV, **vllm_env}, "work": str(work), "servers": {}}

    plan = plan_levels(args.concurrency, args.requests)
    tokenizer = AutoTokenizer.from_pretrained(ensure_demo_model())
    prompts = make_prompts(tokenizer, plan[-1][2][-1] + 1)
    rows: list[dict] = []
    for name, folder in model_dirs(args.models, work).items():
        if "generate" in engines:
            loaded = load_model(folder)
            for batch, warm, chosen in plan:
                r = generate_baseline(loaded, prompts[warm][0], [prompts[i][0] for i in chosen], batch)
                rows.append({"model": name, "engine": ENGINES["generate"], "engine_version": torch.__version__, **r})
                print(f"{name} generate() batch {batch}: {r['output_tokens_per_s']:.1f} tok/s", flush=True)
            del loaded
            write(rows, meta, args.results)
        for engine in (e for e in SERVERS if e in engines):
            label = ENGINES[engine]
            if engine in unavailable:
                rows.append({"model": name, "engine": label, "skipped": unavailable[engine], "attempted": False})
                continue
            log = work / "logs" / f"{name}-{engine}.log"
            extra: dict = {"ignore_eos": True}
            row_facts: dict = {}
            print(f"{name} {label}: starting (log {log})", flush=True)
            try:
                if engine == "ours":
                    server = srv.start_ours(folder, log, args.startup_timeout, len(cpus) if cpus else None)
                elif engine == "vllm":
                    server = srv.start_vllm(args.vllm_python, folder, log, args.startup_timeout, cpus, vllm_env)
                else:
                    gguf = gguf_file(name, work)
                    eog = srv.llamacpp_eog_ids(args.llamacpp_python, gguf)
                    extra = {"logit_bias": {str(i): -1e9 for i in eog}}
                    row_facts = {"gguf_type": GGUF[name][0], "eog_ids_forbidden": eog}
                    server = srv.start_llamacpp(args.llamacpp_python, gguf, log, args.startup_timeout, threads)
            except (srv.ServerFailed, subprocess.CalledProcessError) as e:
                print(f"{name} {label}: not measured: {e}", file=sys.stderr, flush=True)
                why = " - ".join(x for x in (str(e).splitlines()[0].rstrip(":"), error_lines(str(e))) if x)
                rows.append({"model": name, "engine": label, "attempted": True, "skipped": "did not start: " + why})
                write(rows, meta, args.results)
                continue
            print(f"{name} {label}: up after {server.startup_s:.0f} s", flush=True)
            meta["servers"][f"{name} {engine}"] = {"startup_s": server.startup_s, "log": str(log), **server.notes}
            try:
                for c, warm, chosen in plan:
                    if not server.alive():
                        r = summarize([{"error": f"server exited with code {server.proc.returncode}"}] * len(chosen),
                                      c, 0.0)
                    else:
                        r = asyncio.run(load_test(server.url, prompts[warm][1], [prompts[i][1] for i in chosen],
                                                  c, extra))
                    rows.append({"model": name, "engine": label, "engine_version": engine_version[engine],
                                 **row_facts, **r})
                    print(f"{name} {label} concurrency {c}: {r['output_tokens_per_s']:.1f} tok/s, TTFT p50 "
                          f"{_ms(r['ttft_p50_s'])} ms, TPOT p50 {_ms(r['tpot_p50_s'])} ms, failed {r['failed']}/"
                          f"{r['requests']}" + (f" ({r['errors'][0]})" if r.get("errors") else ""), flush=True)
            finally:
                server.stop()
            write(rows, meta, args.results)
    write(rows, meta, args.results)
    return 0


def error_lines(text: str) -> str:
    """The lines of a server's log tail that say what went wrong (for the table's notes)."""
    hits = [line.strip() for line in text.splitlines()[1:] if "Error" in line or "error" in line]
    return " / ".join(hits[-2:])[:400]


if __name__ == "__main__":
    sys.exit(main())
