"""Quality of every scheme on the demo model, against the original measured in the same run.

For each configuration: quantize (timed, without verification), save, reload the folder through
llmquant's runtime (quantized layers, as served), and measure perplexity on the held-out
evaluation split of the built-in corpus (the same tokens for every row), plus KL divergence and
top-1 agreement against the original on 2,048 of those tokens.

    python benchmarks/quality.py                     # every configuration (~40 min on 2 cores)
    python benchmarks/quality.py --only W8A16 FP8    # re-measure rows (by name prefix) in place
    bash benchmarks/setup_llmcompressor.sh           # once: llm-compressor in /tmp/lc-venv
    python benchmarks/quality.py --only "W4A16 g64 sym GPTQ" "llm-compressor W4A16"

Rows named "llm-compressor ..." quantize with llm-compressor in its own environment
(--lc-python), on the same calibration windows (exported as token ids) and the same evaluation.
Every quantization runs in a child process, which reports its wall time (load to saved folder)
and its own peak resident memory.

Writes benchmarks/results/quality.json and quality.md (rewritten after every row, so an
interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent))
from speed import cpu_description  # noqa: E402

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
    # GPTQ with its defaults (act_order, Hessian-weighted clipping, one least-squares scale refit),
    # then without the refinements, to show what each adds.
    ("W4A16 g64 sym GPTQ", dict(scheme="W4A16", group_size=64, gptq=True, **CAL)),
    ("W4A16 g64 sym GPTQ, act_order only", dict(
        scheme="W4A16", group_size=64, gptq=dict(act_order=True, weighted_clipping=False, refit_rounds=0), **CAL)),
    ("W4A16 g64 sym GPTQ, plain", dict(
        scheme="W4A16", group_size=64, gptq=dict(act_order=False, weighted_clipping=False, refit_rounds=0), **CAL)),
    ("W4A16 g64 asym GPTQ", dict(scheme="W4A16_ASYM", group_size=64, gptq=True, **CAL)),
    ("W8A8 SmoothQuant + GPTQ", dict(scheme="W8A8", gptq=True, **CAL)),
    # Automatic mixed precision: W4A16 / W8A16 per layer by sensitivity, 5 bits per weight on average.
    ("W4A16 g64 sym GPTQ mixed 5 bits", dict(scheme="W4A16", group_size=64, gptq=True, target_bits=5.0, **CAL)),
    # llm-compressor's own configuration names (benchmarks/llmcompressor_run.py), same calibration.
    ("llm-compressor W4A16 g64 sym RTN", dict(llmcompressor="W4A16 g64 sym RTN")),
    ("llm-compressor W4A16 g64 sym GPTQ", dict(llmcompressor="W4A16 g64 sym GPTQ", **CAL)),
    ("llm-compressor W4A16 g64 asym GPTQ", dict(llmcompressor="W4A16 g64 asym GPTQ", **CAL)),
    ("llm-compressor W8A8 SmoothQuant + GPTQ", dict(llmcompressor="W8A8 SmoothQuant + GPTQ", **CAL)),
    ("llm-compressor FP8_DYNAMIC", dict(llmcompressor="FP8_DYNAMIC")),
]
LC_PYTHON = "/tmp/lc-venv/bin/python"


def quantize_in_child(kwargs: dict, demo_dir: Path, out: Path, lc_python: str) -> dict:
    """Quantize in a fresh process (ours or llm-compressor's) and return its time and peak memory."""
    if "llmcompressor" in kwargs:
        cal = out.parent / "calibration.safetensors"
        _export_calibration(demo_dir, cal, kwargs.get("num_samples", CAL["num_samples"]),
                            kwargs.get("seq_len", CAL["seq_len"]))
        cmd = [lc_python, str(Path(__file__).parent / "llmcompressor_run.py"), kwargs["llmcompressor"],
               str(demo_dir), str(cal), str(out)]
    else:
        cmd = [sys.executable, __file__, "--quantize-child", json.dumps(kwargs), str(demo_dir), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _export_calibration(demo_dir: Path, path: Path, num_samples: int, seq_len: int) -> None:
    """The calibration windows llmquant.quantize draws (builtin corpus, seed 0), as token ids."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from llmquant.data import calibration_batches

    tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    ids = calibration_batches(tokenizer, "builtin", num_samples=num_samples, seq_len=seq_len, seed=0)
    save_file({"input_ids": ids.contiguous()}, str(path))


def quantize_child(kwargs_json: str, demo_dir: str, out: str) -> int:
    import resource

    from llmquant import quantize

    t = time.perf_counter()
    quantize(demo_dir, output=out, verify=False, progress=False, dtype="float32", **json.loads(kwargs_json))
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


def measure(name: str, kwargs: dict, demo_dir: Path, max_tokens: int, reference, lc_python: str) -> dict:
    from llmquant.eval import perplexity
    from llmquant import load_model
    from llmquant.quant.pipeline.verify import compare_to_reference

    work = Path(tempfile.mkdtemp(prefix="llmquant-bench-"))
    try:
        out = work / "q"
        child = quantize_in_child(kwargs, demo_dir, out, lc_python)
        size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        served = load_model(out, dtype="float32")
        ppl = perplexity(served, max_tokens=max_tokens, progress=False)
        windows, ref_logprobs = reference
        agree = compare_to_reference(served.model, windows, ref_logprobs, progress=False)
        row = {"name": name, "options": kwargs, "perplexity": ppl.perplexity, "checkpoint_mb": size / 1e6,
               "quantize_seconds": child["seconds"], "peak_rss_mb": child["peak_rss_mb"],
               "kl_mean": agree.kl_mean, "top1_agreement": agree.top1_agreement,
               "command": "python " + shlex.join(sys.argv), "date": time.strftime("%Y-%m-%d")}
        if "llmcompressor" in child:
            row["tool"] = f"llm-compressor {child['llmcompressor']}"
        return row
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
    tools = sorted({r["tool"] for r in rows if r.get("tool")})
    meta = {**meta, "llmcompressor": ", ".join(tools) or None}
    (RESULTS / "quality.json").write_text(json.dumps({"meta": meta, "baseline": baseline, "rows": rows},
                                                     indent=2) + "\n")
    lines = [
        "# Quantization quality on the demo model (SmolLM2-135M-Instruct)", "",
        f"Perplexity on the first {meta['max_tokens']:,} tokens of the built-in corpus's held-out split "
        f"({meta['method']}), each quantized checkpoint reloaded through llmquant's runtime. "
        f"KL and top-1 agreement against the original on 2,048 of those tokens. "
        f"Original (bf16 weights): perplexity **{baseline['perplexity']:.3f}**, "
        f"{baseline['checkpoint_mb']:.1f} MB.", "",
        "| configuration | perplexity | change | KL (nats/token) | top-1 agreement | checkpoint MB | quantize s "
        "| peak RAM MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['perplexity']:.3f} | {r['change_pct']:+.2f}% | {r['kl_mean']:.4f} | "
                     f"{100 * r['top1_agreement']:.1f}% | {r['checkpoint_mb']:.1f} | {r['quantize_seconds']:.1f} | "
                     + (f"{r['peak_rss_mb']:,.0f} |" if r.get("peak_rss_mb") else "— |"))
    lines += ["", "Quantize time and peak RAM: a child process from loading the model to the saved folder "
              "(rows without peak RAM were timed in-process). llm-compressor rows: "
              + (meta["llmcompressor"] or "not measured") + ", in its own environment, on the same "
              "calibration windows (64 x 512 tokens where calibration is used).",
              "", f"Machine of the latest run: {meta['machine']} (each row's own in quality.json); "
              f"torch {meta['torch']}, {meta['threads']} threads, float32 compute."]
    commands: dict[str, int] = {}
    for r in rows:
        commands[r.get("command", meta["command"])] = commands.get(r.get("command", meta["command"]), 0) + 1
    lines += [f"Rows measured by `{c}`: {n}" for c, n in commands.items()] + [""]
    (RESULTS / "quality.md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--only", nargs="*", default=None, help="row name prefixes to run")
    parser.add_argument("--lc-python", default=LC_PYTHON, help="python of llm-compressor's environment")
    parser.add_argument("--quantize-child", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quantize_child:
        return quantize_child(*args.quantize_child)

    from llmquant.eval import perplexity
    from llmquant import load_model
    from llmquant.data import evaluation_tokens
    from llmquant.loading.demo import ensure_demo_model
    from llmquant.quant.pipeline.verify import reference_logprobs

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
            "threads": torch.get_num_threads(), "machine": cpu_description(),
            "command": "python " + shlex.join(sys.argv), "date": time.strftime("%Y-%m-%d")}
    print(f"original: perplexity {baseline['perplexity']:.3f}", flush=True)
    rows = previous_rows(args.max_tokens) if args.only else []
    # In the order of --only's prefixes (then the table's order), so the rows compared come first.
    names = [n for n, _ in CONFIGS]  # an exact row name selects only that row; otherwise a prefix
    order = [n for p in (args.only or [""]) for n in names if n == p or (p not in names and n.startswith(p))]
    for name in dict.fromkeys(order):
        kwargs = dict(CONFIGS)[name]
        row = measure(name, kwargs, demo_dir, args.max_tokens, reference, args.lc_python)
        row["machine"] = meta["machine"]  # rows re-measured later may come from another machine

        rows = [r for r in rows if r["name"] != name] + [row]
        rows.sort(key=lambda r: [n for n, _ in CONFIGS].index(r["name"]) if r["name"] in dict(CONFIGS) else 999)
        write(rows, baseline, meta)
        print(f"{name}: perplexity {row['perplexity']:.3f} ({100 * (row['perplexity'] / baseline['perplexity'] - 1):+.2f}%), "
              f"KL {row['kl_mean']:.4f}, {row['checkpoint_mb']:.1f} MB, {row['quantize_seconds']:.1f} s, "
              f"peak {row['peak_rss_mb']:,.0f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
