"""Quality of every scheme on the demo model, against the original measured in the same run.

For each configuration: quantize (timed, without verification), save, reload the folder through
llmquant's runtime (quantized layers, as served), and measure perplexity on the held-out
evaluation split of the built-in corpus (the same tokens for every row), plus KL divergence and
top-1 agreement against the original on 2,048 of those tokens.

    python benchmarks/quality.py                     # every configuration (~40 min on 2 cores)
    python benchmarks/quality.py --only W8A16 FP8    # re-measure rows (by name prefix) in place

Writes benchmarks/results/quality.json and quality.md (rewritten after every row, so an
interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
CAL = dict(num_samples=64, seq_len=512)  # static-activation calibration: 32,768 tokens

# (row name, quantize() keyword arguments)
CONFIGS: list[tuple[str, dict]] = [
    ("W8A16 minmax", dict(scheme="W8A16")),
    ("W4A16 g64 sym minmax", dict(scheme="W4A16", group_size=64, observer="minmax")),
    ("W4A16 g64 sym percentile99.9", dict(scheme="W4A16", group_size=64, observer="percentile", percentile=99.9)),
    ("W4A16 g64 sym mse", dict(scheme="W4A16", group_size=64, observer="mse")),
    ("W4A16 g64 asym minmax", dict(scheme="W4A16_ASYM", group_size=64, observer="minmax")),
    ("W4A16 g64 asym percentile99.9", dict(scheme="W4A16_ASYM", group_size=64, observer="percentile",
                                           percentile=99.9)),
    ("W4A16 g64 asym mse", dict(scheme="W4A16_ASYM", group_size=64, observer="mse")),
    ("W8A8 dynamic, no SmoothQuant", dict(scheme="W8A8", smoothquant=False)),
    ("W8A8 dynamic + SmoothQuant auto (default)", dict(scheme="W8A8", **CAL)),
    ("W8A8 static minmax, no SmoothQuant", dict(scheme="W8A8", activations="static", smoothquant=False, **CAL)),
    ("W8A8 static percentile99.99, no SmoothQuant", dict(scheme="W8A8", activations="static", smoothquant=False,
                                                         observer="percentile", percentile=99.99, **CAL)),
    ("W8A8 static minmax + SmoothQuant auto (default)", dict(scheme="W8A8", activations="static", **CAL)),
    ("FP8 static minmax (default)", dict(scheme="FP8", **CAL)),
    ("FP8 static percentile99.99", dict(scheme="FP8", observer="percentile", percentile=99.99, **CAL)),
    ("FP8 static minmax + SmoothQuant auto", dict(scheme="FP8", smoothquant="auto", **CAL)),
    ("FP8_DYNAMIC, no SmoothQuant", dict(scheme="FP8_DYNAMIC", smoothquant=False)),
    ("FP8_DYNAMIC + SmoothQuant auto (default)", dict(scheme="FP8_DYNAMIC", **CAL)),
    ("FP8_W", dict(scheme="FP8_W")),
]


def measure(name: str, kwargs: dict, demo_dir: Path, max_tokens: int, reference) -> dict:
    from eval import perplexity
    from llmquant import load_model, quantize
    from llmquant.quant.verify import compare_to_reference

    work = Path(tempfile.mkdtemp(prefix="llmquant-bench-"))
    try:
        out = work / "q"
        t = time.perf_counter()
        quantize(demo_dir, output=out, verify=False, progress=False, dtype="float32", **kwargs)
        seconds = time.perf_counter() - t
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        served = load_model(out, dtype="float32")
        ppl = perplexity(served, max_tokens=max_tokens, progress=False)
        windows, ref_logprobs = reference
        agree = compare_to_reference(served.model, windows, ref_logprobs, progress=False)
        return {"name": name, "options": kwargs, "perplexity": ppl.perplexity, "checkpoint_mb": size / 1e6,
                "quantize_seconds": seconds, "kl_mean": agree.kl_mean, "top1_agreement": agree.top1_agreement,
                "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d")}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def previous_rows(max_tokens: int) -> list[dict]:
    """Rows of an earlier run on the same tokens, so that --only re-measures rows in place."""
    path = RESULTS / "quality.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return data["rows"] if data["meta"]["max_tokens"] == max_tokens else []


def write(rows: list[dict], baseline: dict, meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r["change_pct"] = 100.0 * (r["perplexity"] / baseline["perplexity"] - 1.0)
    (RESULTS / "quality.json").write_text(json.dumps({"meta": meta, "baseline": baseline, "rows": rows},
                                                     indent=2) + "\n")
    lines = [
        "# Quantization quality on the demo model (SmolLM2-135M-Instruct)", "",
        f"Perplexity on the first {meta['max_tokens']:,} tokens of the built-in corpus's held-out split "
        f"({meta['method']}), each quantized checkpoint reloaded through llmquant's runtime. "
        f"KL and top-1 agreement against the original on 2,048 of those tokens. "
        f"Original (bf16 weights): perplexity **{baseline['perplexity']:.3f}**, "
        f"{baseline['checkpoint_mb']:.1f} MB.", "",
        "| configuration | perplexity | change | KL (nats/token) | top-1 agreement | checkpoint MB | quantize s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['perplexity']:.3f} | {r['change_pct']:+.2f}% | {r['kl_mean']:.4f} | "
                     f"{100 * r['top1_agreement']:.1f}% | {r['checkpoint_mb']:.1f} | {r['quantize_seconds']:.1f} |")
    lines += ["", f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads, float32 compute."]
    commands: dict[str, int] = {}
    for r in rows:
        commands[r.get("command", meta["command"])] = commands.get(r.get("command", meta["command"]), 0) + 1
    lines += [f"Rows measured by `{c}`: {n}" for c, n in commands.items()] + [""]
    (RESULTS / "quality.md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--only", nargs="*", default=None, help="row name prefixes to run")
    args = parser.parse_args()

    from eval import perplexity
    from llmquant import load_model
    from llmquant.data import evaluation_tokens
    from llmquant.loading.demo import ensure_demo_model
    from llmquant.quant.verify import reference_logprobs

    demo_dir = ensure_demo_model()
    original = load_model(demo_dir, dtype="float32")
    base_ppl = perplexity(original, max_tokens=args.max_tokens, progress=False)
    baseline = {"perplexity": base_ppl.perplexity,
                "checkpoint_mb": sum(p.stat().st_size for p in demo_dir.glob("*.safetensors")) / 1e6}
    ids = evaluation_tokens(original.tokenizer, max_tokens=2048)
    windows = ids.reshape(4, 512)
    reference = (windows, reference_logprobs(original.model, windows, progress=False))
    del original
    m = base_ppl.method
    method = f"window {m.get('window')}, stride {m.get('stride')}, token-level"
    meta = {"max_tokens": args.max_tokens, "method": method, "method_detail": m, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": f"{platform.machine()} {platform.processor()}".strip(),
            "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d")}
    print(f"original: perplexity {baseline['perplexity']:.3f}", flush=True)
    rows = previous_rows(args.max_tokens) if args.only else []
    for name, kwargs in CONFIGS:
        if args.only and not any(name.startswith(p) for p in args.only):
            continue
        row = measure(name, kwargs, demo_dir, args.max_tokens, reference)
        rows = [r for r in rows if r["name"] != name] + [row]
        rows.sort(key=lambda r: [n for n, _ in CONFIGS].index(r["name"]) if r["name"] in dict(CONFIGS) else 999)
        write(rows, baseline, meta)
        print(f"{name}: perplexity {row['perplexity']:.3f} ({100 * (row['perplexity'] / baseline['perplexity'] - 1):+.2f}%), "
              f"KL {row['kl_mean']:.4f}, {row['checkpoint_mb']:.1f} MB, {row['quantize_seconds']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
