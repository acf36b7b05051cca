"""Serving throughput: `llmquant serve` over HTTP against transformers `generate()`, same run.

For each model (the demo model as stored, and its W4A16 and W8A8 folders): start a real
`llmquant serve` process, send the same prompts from streaming clients at concurrency 1, 8 and
32, and record output tokens/s and time to first token (p50/p99); then, in this process, run
transformers' `generate()` on the same model object llmquant loads (same quantized layers, same
dtype) over the same prompts, one at a time and in left-padded batches of 8 and 32.

Every request generates exactly OUTPUT_TOKENS tokens (ignore_eos), so tokens/s compare like
with like. The client is a single asyncio loop (little CPU taken from the server).

    python benchmarks/serving.py                 # ~15 min on 2 CPU cores
    python benchmarks/serving.py --models bf16   # one model (the others' rows are kept)

Writes benchmarks/results/serving.json and serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
PROMPT_TOKENS = 128
OUTPUT_TOKENS = 64
CONCURRENCY = (1, 8, 32)
GENERATE_BATCHES = (1, 8, 32)
ORDER = ("bf16", "W4A16", "W8A8")
QUANTIZE = {"W4A16": dict(scheme="W4A16", group_size=64), "W8A8": dict(scheme="W8A8", num_samples=32, seq_len=256)}


def prompts(tokenizer, n: int) -> list[list[int]]:
    """n prompts of PROMPT_TOKENS tokens each, consecutive slices of the held-out split."""
    from llmquant.data import evaluation_tokens

    ids = evaluation_tokens(tokenizer, max_tokens=n * PROMPT_TOKENS)
    return [ids[i * PROMPT_TOKENS:(i + 1) * PROMPT_TOKENS].tolist() for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# ---- our server ---------------------------------------------------------------------------

def start_server(model_dir: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llmquant", "serve", str(model_dir), "--port", str(port),
                             "--served-model-name", "m", "--max-batch-size", "32"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


async def one_request(client, prompt: list[int]) -> tuple[float, float, int]:
    """(time to first token, end-to-end seconds, output tokens) of one streamed completion."""
    t0 = time.perf_counter()
    first = None
    stream = await client.completions.create(model="m", prompt=prompt, max_tokens=OUTPUT_TOKENS, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    tokens = 0
    async for chunk in stream:
        if chunk.choices and first is None:
            first = time.perf_counter() - t0
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first, time.perf_counter() - t0, tokens


async def load_test(url: str, all_prompts: list[list[int]], concurrency: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    n = max(2 * concurrency, 4)
    queue = list(all_prompts[:n])
    results = []

    async def worker():
        while queue:
            results.append(await one_request(client, queue.pop()))

    await one_request(client, all_prompts[0])  # warm-up: kernels prepared, caches allocated
    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t
    await client.close()  # before asyncio.run closes the loop under its connections
    ttft = [r[0] for r in results]
    tokens = sum(r[2] for r in results)
    return {"concurrency": concurrency, "requests": n, "output_tokens": tokens, "seconds": wall,
            "output_tokens_per_s": tokens / wall, "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99)}


# ---- transformers generate() baseline -------------------------------------------------------

def generate_baseline(loaded, all_prompts: list[list[int]], batch: int) -> dict:
    model = loaded.model
    n = max(2 * batch, 4) if batch > 1 else 4
    chosen = all_prompts[:n]

    def run(group):
        ids = torch.tensor(group)  # equal lengths: no padding needed, same work as ours
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUTPUT_TOKENS,
                                 min_new_tokens=OUTPUT_TOKENS, do_sample=False, pad_token_id=0)
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    run(chosen[:1])  # warm-up
    t = time.perf_counter()
    tokens = sum(run(chosen[i:i + batch]) for i in range(0, n, batch))
    wall = time.perf_counter() - t
    return {"batch": batch, "requests": n, "output_tokens": tokens, "seconds": wall,
            "output_tokens_per_s": tokens / wall}


def model_dirs(names: list[str], work: Path) -> dict[str, Path]:
    from llmquant import quantize
    from llmquant.loading.demo import ensure_demo_model

    demo = ensure_demo_model()
    dirs = {}
    for name in names:
        if name == "bf16":
            dirs[name] = demo
            continue
        out = work / name
        print(f"quantizing the demo model to {name}", flush=True)
        quantize(demo, output=out, verify=False, progress=False, **QUANTIZE[name])
        dirs[name] = out
    return dirs


def write(rows: list[dict], meta: dict) -> None:
    """Write this run's rows; rows of models this run did not measure are kept from the file
    (each row names the command and date that measured it)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "serving.json"
    measured = {r["model"] for r in rows}
    kept = []
    if path.exists():
        old = json.loads(path.read_text())
        kept = [{"command": old["meta"]["command"], "date": old["meta"].get("date"), **r}
                for r in old["rows"] if r["model"] not in measured]
    rows = sorted(kept + [{"command": meta["command"], "date": meta["date"], **r} for r in rows],
                  key=lambda r: ORDER.index(r["model"]) if r["model"] in ORDER else len(ORDER))
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Serving throughput on the demo model ({meta['device']})", "",
             f"Prompts of {PROMPT_TOKENS} tokens from the held-out corpus, {OUTPUT_TOKENS} output tokens each "
             "(ignore_eos), greedy. `llmquant serve` measured over HTTP with streaming clients; transformers "
             "`generate()` on the same loaded model in the same run.", "",
             "| model | engine | concurrency / batch | output tok/s | TTFT p50 s | TTFT p99 s | vs generate() batch 1 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ttft = (f"{r['ttft_p50_s']:.3f} | {r['ttft_p99_s']:.3f}" if "ttft_p50_s" in r else " | ")
        lines.append(f"| {r['model']} | {r['engine']} | {r.get('concurrency', r.get('batch'))} | "
                     f"{r['output_tokens_per_s']:.1f} | {ttft} | {r['vs_generate_batch1']:.2f}x |")
    lines += ["", f"torch {meta['torch']}, {meta['threads']} threads."]
    for command in dict.fromkeys(r["command"] for r in rows):
        models = ", ".join(dict.fromkeys(r["model"] for r in rows if r["command"] == command))
        dates = ", ".join(sorted({r["date"] for r in rows if r["command"] == command and r.get("date")}))
        lines.append(f"- {models}: `{command}` ({dates})")
    lines.append("")
    (RESULTS / "serving.md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(ORDER), choices=ORDER,
                        help="models to measure (default: all); rows of the others stay as they are")
    args = parser.parse_args()

    from llmquant import load_model
    from llmquant.runtime import describe_device

    meta = {"device": describe_device(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
            "prompt_tokens": PROMPT_TOKENS, "output_tokens": OUTPUT_TOKENS}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="llmquant-serving-") as work:
        for name, folder in model_dirs(args.models, Path(work)).items():
            loaded = load_model(folder)
            all_prompts = prompts(loaded.tokenizer, 64)
            base = {}
            for batch in GENERATE_BATCHES:
                r = generate_baseline(loaded, all_prompts, batch)
                base[batch] = r["output_tokens_per_s"]
                rows.append({"model": name, "engine": "transformers generate()", **r})
                print(f"{name} generate() batch {batch}: {r['output_tokens_per_s']:.1f} tok/s", flush=True)
            del loaded
            proc, url = start_server(folder)
            try:
                for c in CONCURRENCY:
                    r = asyncio.run(load_test(url, all_prompts, c))
                    rows.append({"model": name, "engine": "llmquant serve", **r})
                    print(f"{name} llmquant serve concurrency {c}: {r['output_tokens_per_s']:.1f} tok/s, "
                          f"TTFT p50 {r['ttft_p50_s']:.3f} s", flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
            for r in rows:
                if r["model"] == name:
                    r["vs_generate_batch1"] = r["output_tokens_per_s"] / base[1]
            write(rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
