"""Pruning on the demo model: magnitude, Wanda, SparseGPT and ADMM at 50% unstructured and 2:4,
ours against llm-compressor's SparseGPT and Wanda (its own environment, benchmarks/llmcompressor_run.py),
then ADMM 2:4 composed with quantization, then 2:4 SparseGPT + distillation with the masks held.

    bash benchmarks/setup_llmcompressor.sh            # once: llm-compressor in /tmp/lc-venv
    python benchmarks/sparsity.py --work /tmp/sparsity

Everyone prunes on the same calibration windows (the built-in corpus's calibration split, seed 0,
--num-samples x 512 tokens: llmquant draws them, llm-compressor reads them as token ids). Every row
is a saved folder reloaded through llmquant's runtime and measured the same way (float32):
perplexity on the first 16,384 tokens of the held-out split (window 1024), KL and top-1 agreement
against the original on 2,048 held-out tokens, and the fraction of zeros in the pruned layers.
Each pruning run is a child process: its wall time (load to saved folder) and peak RSS are its own.
Both tools compute in float32 (llmcompressor_run.py loads the model in float32; ours gets
dtype float32) and store the result in the checkpoint's bfloat16. ADMM has no llm-compressor
counterpart: its rows are compared with llm-compressor's SparseGPT at the same pattern.
Writes benchmarks/results/sparsity.{json,md} after every row.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent))
from folder_eval import AGREE_TOKENS, EVAL_DTYPE, EVAL_TOKENS, WINDOW, FolderEvaluator, number as _num  # noqa: E402
from speed import cpu_description  # noqa: E402

LC_PYTHON = "/tmp/lc-venv/bin/python"
PRUNE_ROWS = [  # (name, ours: llmquant.prune keywords, llm-compressor config or None); the targets' rows first
    ("SparseGPT 2:4", dict(method="sparsegpt", pattern="2:4"), "SparseGPT 2:4"),
    ("ADMM 2:4", dict(method="admm", pattern="2:4"), None),
    ("SparseGPT 50%", dict(method="sparsegpt"), "SparseGPT 50%"),
    ("ADMM 50%", dict(method="admm"), None),
    ("ADMM 50%, outlier allocation", dict(method="admm", allocation="outlier"), None),
    ("Wanda 2:4", dict(method="wanda", pattern="2:4"), "Wanda 2:4"),
    ("Wanda 50%", dict(method="wanda"), "Wanda 50%"),
    ("magnitude 2:4", dict(method="magnitude", pattern="2:4"), None),
    ("magnitude 50%", dict(method="magnitude"), None),
]
COMPOSED_ROWS = [  # (name, ours: llmquant.quantize keywords, llm-compressor config or None)
    ("ADMM 2:4 + W4A16 g64 GPTQ", dict(scheme="W4A16", group_size=64, gptq=True, prune="admm",
                                      sparsity_pattern="2:4"), None),
    ("ADMM 2:4 + FP8_DYNAMIC", dict(scheme="FP8_DYNAMIC", smoothquant=False, prune="admm", sparsity_pattern="2:4"),
     None),
]
COMPARED_WITH = {"ADMM 2:4": "SparseGPT 2:4", "ADMM 50%": "SparseGPT 50%",
                 "ADMM 50%, outlier allocation": "SparseGPT 50%"}  # our row -> llm-compressor's row
COMPUTE_DTYPE = "float32"  # what llmcompressor_run.py loads the model in


def child(kind: str, kwargs_json: str, demo: str, out: str, samples: int) -> int:
    """One pruning / quantization run in this process: prints its seconds and peak RSS."""
    import llmquant
    from llmquant.config.options import LoadOptions

    kwargs = json.loads(kwargs_json)
    load = LoadOptions(dtype=COMPUTE_DTYPE)
    t = time.perf_counter()
    if kind == "prune":
        llmquant.prune(demo, out, calibration=llmquant.CalibrationConfig(num_samples=samples, seq_len=512),
                       verify_tokens=0, progress=False, load=load, **kwargs)
    else:
        llmquant.quantize(demo, output=out, num_samples=samples, seq_len=512, verify=False, progress=False, load=load,
                          **kwargs)
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


def run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(ev: FolderEvaluator, folder: Path) -> dict:
    """The evaluator's measures, plus the fraction of zeros in the pruned layers."""
    from llmquant import load_model
    from llmquant.quant.linear import QuantizedLinear

    loaded = load_model(folder, dtype=EVAL_DTYPE)
    zeros = total = 0
    for name, p in loaded.model.named_parameters():  # float weights; MoE experts held as 3-D tensors
        if p.ndim >= 2 and "embed" not in name and not name.startswith("lm_head"):
            zeros, total = zeros + int((p == 0).sum()), total + p.numel()
    for m in loaded.model.modules():
        if isinstance(m, QuantizedLinear):
            w = m.dequantized_weight()
            zeros, total = zeros + int((w == 0).sum()), total + w.numel()
    measured = ev.measure_loaded(loaded)
    return {"ppl": measured.pop("ppl_corpus"), **measured, "zeros": zeros / total if total else 0.0}


def write(rows: list[dict], meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sparsity.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    o = meta["original"]["ppl"]
    lines = ["# Pruning on the demo model (SmolLM2-135M-Instruct)", "",
             f"Perplexity on the first {EVAL_TOKENS:,} tokens of the built-in corpus's held-out split (window "
             f"{WINDOW}, float32), KL and top-1 agreement against the original on {AGREE_TOKENS:,} held-out tokens; "
             f"every tool pruned on the same {meta['settings']['num_samples']} x 512 calibration tokens. "
             "Both tools compute in float32 and store bfloat16. 'increase': perplexity over the original's; "
             "'vs llm-compressor': our increase / theirs for the same method and pattern (ADMM: / their SparseGPT's "
             "at the same pattern); 'time vs': our time / theirs, same pairs. Every row is a saved folder reloaded through llmquant's runtime. Every Linear "
             "layer of the decoder is pruned; the output layer and embeddings are not.", "",
             f"Original: {o:.3f}.", "",
             "| row | tool | ppl | increase | vs llm-compressor | KL | top-1 | zeros | time s | time vs | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    theirs = {r["name"]: r for r in rows if r["tool"] == "llm-compressor"}
    for r in rows:
        ratio = speed = ""
        base = theirs.get(COMPARED_WITH.get(r["name"], r["name"])) if r["tool"] == "llmquant" else None
        if base is not None and base["ppl"] > o:
            ratio = f"{(r['ppl'] - o) / (base['ppl'] - o):.2f}x"
        if base is not None and r.get("seconds") and base.get("seconds"):
            speed = f"{r['seconds'] / base['seconds']:.2f}x"
        lines.append(f"| {r['name']} | {r['tool']} | {r['ppl']:.3f} | {r['ppl'] - o:+.3f} ({100 * (r['ppl'] / o - 1):+.1f}%) "
                     f"| {ratio} | {r['kl_mean']:.4f} | {100 * r['top1_agreement']:.1f}% | {100 * r['zeros']:.1f}% | "
                     f"{_num(r.get('seconds'))} | {speed} | {_num(r.get('peak_rss_mb'))} |")
    recovery = [r for r in rows if r.get("recovered_from")]
    for r in recovery:
        base = next(b for b in rows if b["name"] == r["recovered_from"] and b["tool"] == "llmquant")
        lost = base["ppl"] - o
        lines.append("")
        lines.append(f"Recovery: {r['steps']} distillation steps of {r['batch_size']} x {r['seq_len']} tokens "
                     f"({r['seconds_per_step']:.2f} s/step) took {r['recovered_from']} from {base['ppl']:.3f} to "
                     f"{r['ppl']:.3f}: {100 * (base['ppl'] - r['ppl']) / lost:.0f}% of its increase recovered; "
                     f"zeros {100 * r['zeros']:.1f}% (masks held).")
    lines += ["", f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads; llm-compressor "
              f"{meta.get('llmcompressor') or 'not run'}. Commit {meta['commit']}. Date {meta['date']}.",
              f"Command: `{meta['command']}`"]
    (RESULTS / "sparsity.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/llmquant-sparsity", help="pruned folders")
    p.add_argument("--num-samples", type=int, default=64, help="calibration windows of 512 tokens, for everyone")
    p.add_argument("--lc-python", default=LC_PYTHON)
    p.add_argument("--recovery-steps", type=int, default=200, help="distillation steps after SparseGPT 2:4 (0: none)")
    p.add_argument("--recovery-batch", type=int, default=4)
    p.add_argument("--recovery-seq-len", type=int, default=256)
    p.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child, args.num_samples)

    from llmquant.loading.demo import ensure_demo_model

    demo = Path(ensure_demo_model(quiet=True))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).parent
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "llmquant", "benchmarks/*.py"],
                           capture_output=True, text=True, cwd=here.parent).stdout.strip()
    lc = Path(args.lc_python).exists()
    lc_version = subprocess.run([args.lc_python, "-c", "import llmcompressor; print(llmcompressor.__version__)"],
                                capture_output=True, text=True).stdout.strip().splitlines()[-1] if lc else None
    ev = FolderEvaluator(demo)
    meta = {"original": {"ppl": ev.original["ppl_corpus"], **ev.original}, "machine": cpu_description(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "llmcompressor": lc_version,
            "commit": commit + (" (uncommitted changes)" if dirty else ""), "date": time.strftime("%Y-%m-%d"),
            "command": "python " + shlex.join(sys.argv),
            "settings": {"num_samples": args.num_samples, "compute_dtype": COMPUTE_DTYPE}}
    rows: list[dict] = []
    cal = work / "calibration.safetensors"
    if lc:
        from quality import _export_calibration

        _export_calibration(demo, cal, args.num_samples, 512)
    else:
        print(f"no llm-compressor at {args.lc_python}: run benchmarks/setup_llmcompressor.sh", file=sys.stderr)

    def add(row: dict) -> None:
        rows.append(row)
        write(rows, meta)
        print(f"{row['name']} ({row['tool']}): ppl {row['ppl']:.3f}, KL {row['kl_mean']:.4f}, zeros {row['zeros']:.3f}, "
              f"{_num(row.get('seconds'))} s", flush=True)

    def ours(kind: str, name: str, kwargs: dict) -> None:
        out = work / f"ours_{name}".replace(" ", "_").replace(":", "of").replace("%", "pct").replace("+", "plus")
        timing = run([sys.executable, __file__, "--num-samples", str(args.num_samples), "--child", kind,
                      json.dumps(kwargs), str(demo), str(out)]) if not (out / "config.json").is_file() else {}
        add({"name": name, "tool": "llmquant", "options": kwargs, **timing, **measure(ev, out)})

    def theirs(name: str, config: str | None) -> None:
        if config is None or not lc:
            return
        out = work / f"lc_{name}".replace(" ", "_").replace(":", "of").replace("%", "pct").replace("+", "plus")
        timing = run([args.lc_python, str(here / "llmcompressor_run.py"), config, str(demo), str(cal), str(out)]) \
            if not (out / "config.json").is_file() else {}
        add({"name": name, "tool": "llm-compressor", "options": config, **timing, **measure(ev, out)})

    for name, kwargs, config in PRUNE_ROWS:
        ours("prune", name, kwargs)
        theirs(name, config)
    for name, kwargs, config in COMPOSED_ROWS:
        ours("quantize", name, kwargs)
        theirs(name, config)
    if args.recovery_steps:
        import llmquant

        base = work / "ours_SparseGPT_2of4"
        out = work / "recovered_SparseGPT_2of4"
        result = llmquant.distill(demo, output=out, student_init=base, steps=args.recovery_steps,
                                  batch_size=args.recovery_batch, seq_len=args.recovery_seq_len, overwrite=True,
                                  progress=False)
        add({"name": "SparseGPT 2:4 + distillation", "tool": "llmquant", "recovered_from": "SparseGPT 2:4",
             "steps": args.recovery_steps, "batch_size": args.recovery_batch, "seq_len": args.recovery_seq_len,
             "seconds_per_step": result.seconds_per_step, "seconds": result.seconds, **measure(ev, out)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
