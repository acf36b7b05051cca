"""Self-distillation on the demo model: what it recovers after GPTQ, against RTN, GPTQ alone and
the same training on plain cross-entropy (no teacher), on two kinds of held-out text.

    python benchmarks/self_distill.py --work /tmp/sd               # the default grid
    python benchmarks/self_distill.py --budgets 50 200 800 --block-steps 40 --compare-steps 200
    # the budget sweep (benchmarks/results/self_distill_budgets.md): one scheme per run, appended
    python benchmarks/self_distill.py --schemes "W4A16 g64 asym" --budgets 200 50 --block-steps 40 \
        --tokens 65536 --compare-schemes --results self_distill_budgets
    python benchmarks/self_distill.py --schemes "W4A16 g64 sym" --budgets 200 50 --block-steps 40 \
        --tokens 65536 --compare-schemes --results self_distill_budgets --append
    bash benchmarks/setup_llmcompressor.sh                          # once, for the FP8_DYNAMIC baseline
    python benchmarks/self_distill.py --schemes FP8_DYNAMIC --compare-schemes

For each scheme (W4A16 g64 sym / asym, FP8_DYNAMIC): quantize with today's defaults (GPTQ for
W4A16), then `llmquant distill --self` the saved folder (llmquant.distill.self_api) at each
budget and seed, with the KL loss (the original's top-k log-probs) and with cross-entropy
(--self-loss ce); reload every folder through llmquant's runtime and measure:
- perplexity on the built-in corpus's held-out split (calibration and training never read it);
- perplexity on a second source of a different kind: Python source code from this Python's
  standard library (a fixed list of modules, written to <work>/second_source.txt);
- KL and top-1 agreement against the original on 2,048 held-out corpus tokens.
llm-compressor's FP8_DYNAMIC (its own environment, benchmarks/llmcompressor_run.py) is the
baseline of the FP8 rows. Writes benchmarks/results/self_distill.{json,md}, after every row.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent))
from folder_eval import AGREE_TOKENS, EVAL_DTYPE, EVAL_TOKENS, WINDOW, FolderEvaluator, number as _num  # noqa: E402
from speed import cpu_description  # noqa: E402

SECOND_SOURCE_MODULES = ("argparse", "difflib", "textwrap", "fractions", "statistics", "calendar", "heapq",
                         "shlex", "string", "bisect")
SCHEMES = {  # name -> quantize() keywords (today's defaults for each)
    "W4A16 g64 sym": dict(scheme="W4A16", group_size=64, gptq=True),
    "W4A16 g64 asym": dict(scheme="W4A16_ASYM", group_size=64, gptq=True),
    "FP8_DYNAMIC": dict(scheme="FP8_DYNAMIC"),
}
RTN = {"W4A16 g64 sym": dict(scheme="W4A16", group_size=64), "W4A16 g64 asym": dict(scheme="W4A16_ASYM", group_size=64),
       "FP8_DYNAMIC": dict(scheme="FP8_DYNAMIC", smoothquant=False)}
LC_PYTHON = "/tmp/lc-venv/bin/python"


def second_source(work: Path) -> Path:
    path = work / "second_source.txt"
    lib = Path(sysconfig.get_paths()["stdlib"])
    path.write_text("\n\n".join((lib / f"{m}.py").read_text(encoding="utf-8") for m in SECOND_SOURCE_MODULES),
                    encoding="utf-8")
    return path


def quantize(kwargs: dict, out: Path, demo: Path, lc_python: str) -> float:
    """Quantize into `out` (ours in a child process, or llm-compressor's); returns the seconds."""
    if kwargs.get("llmcompressor"):
        from quality import _export_calibration

        cal = out.parent / "calibration.safetensors"
        _export_calibration(demo, cal, 64, 512)
        cmd = [lc_python, str(Path(__file__).parent / "llmcompressor_run.py"), kwargs["llmcompressor"], str(demo),
               str(cal), str(out)]
    else:
        cmd = [sys.executable, str(Path(__file__).parent / "quality.py"), "--quantize-child", json.dumps(kwargs),
               str(demo), str(out)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def self_distill_row(folder: Path, out: Path, demo: Path, settings: dict) -> dict:
    from llmquant.distill.self_api import self_distill

    t = time.perf_counter()
    # This script measures every saved folder itself: no verification or held-out checks inside.
    result = self_distill(demo, folder, output=out, overwrite=True, progress=False, verify_tokens=0, held_out_tokens=0,
                          **settings)
    section = result.report
    return {"train_seconds": time.perf_counter() - t, "seconds_block": section["seconds_block"],
            "seconds_end_to_end": section["seconds_end_to_end"], "seconds_per_step": section["seconds_per_step"],
            "changed_codes": section["changed_codes"], "trainable_parameters": section["trainable_parameters"]}


def write(rows: list[dict], meta: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    o = meta["original"]
    lines = ["# Self-distillation on the demo model (SmolLM2-135M-Instruct)", "",
             f"Perplexity on the first {EVAL_TOKENS:,} tokens of two held-out sources (window {WINDOW}): the built-in "
             "corpus's held-out split (English technical prose; calibration and training read only its calibration "
             f"split) and Python source code ({', '.join(SECOND_SOURCE_MODULES)} from the standard library of Python "
             f"{meta['python']}), a kind of text the calibration never saw. KL and top-1 agreement against the "
             f"original on {AGREE_TOKENS:,} held-out corpus tokens. Every row is a saved folder reloaded through "
             "llmquant's runtime. Self-distillation (`llmquant distill ORIGINAL --self FOLDER`) starts from the "
             "quantized folder of the row named in 'from'; KL: the original's top-32 log-probs plus the rest of the "
             "vocabulary as one bucket; CE: next-token cross-entropy on the same windows, no teacher.", "",
             f"Original: corpus {o['ppl_corpus']:.3f}, code {o['ppl_second']:.3f}.", "",
             "| row | from | loss | trains | block steps | steps | seed | corpus ppl | change | code ppl | change | KL | top-1 | "
             "train s | s/step |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r.get('from', '')} | {r.get('loss', '')} | {_trains(r.get('train'))} | "
            f"{r.get('block_steps', '')} | "
            f"{r.get('steps', '')} | {r.get('seed', '')} | {r['ppl_corpus']:.3f} | "
            f"{100 * (r['ppl_corpus'] / o['ppl_corpus'] - 1):+.2f}% | {r['ppl_second']:.3f} | "
            f"{100 * (r['ppl_second'] / o['ppl_second'] - 1):+.2f}% | {r['kl_mean']:.4f} | "
            f"{100 * r['top1_agreement']:.1f}% | {_num(r.get('train_seconds') or r.get('quantize_seconds'))} | "
            f"{_num(r.get('seconds_per_step'), 2)} |")
    lines += ["", "train s: the self-distillation run (teacher cache, block-wise phase, end-to-end steps, held-out "
              "checks, save), or for the other rows the quantization (load to saved folder). s/step: one end-to-end "
              "step of batch x seq_len tokens.", "",
              f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads, compute dtype "
              f"{meta['dtype']}."]
    for run in meta["runs"]:  # one per invocation that wrote rows here (--append adds one)
        lines += ["", f"Settings: {json.dumps(run['settings'])}. Commit {run['commit']}. Date {run['date']}.",
                  f"Command: `{run['command']}`"]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def earlier_rows(name: str, meta: dict) -> tuple[list[dict], list[dict]]:
    """The rows and runs already in RESULTS/NAME.json, for --append; refused when they were
    measured on another machine or against another original (their numbers would not compare)."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return [], []
    old = json.loads(path.read_text())

    def same(m: dict) -> dict:  # the original's perplexities to the printed digits (the last bits may differ)
        return {"machine": m["machine"], "torch": m["torch"], "threads": m["threads"],
                "original": [round(m["original"][k], 3) for k in ("ppl_corpus", "ppl_second")]}

    if same(old["meta"]) != same(meta):
        raise SystemExit(f"--append: {path} was measured on another machine, torch or thread count, or against "
                         f"another original ({same(old['meta'])} vs now {same(meta)}); use another --results name.")
    runs = old["meta"].get("runs") or [{k: old["meta"][k] for k in ("commit", "date", "command", "settings")}]
    return old["rows"], runs


def _trains(train) -> str:
    """What a trained row trained, for the table ('' for the quantized rows)."""
    if train is None:
        return ""
    return "scales, zero points, norms" if train == "default" else ", ".join(train).replace("_", " ")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/llmquant-self-distill", help="quantized folders and the second source")
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--budgets", nargs="+", type=int, default=[64],
                   help="end-to-end steps of the full recipe (block-wise first), KL loss, seed 0")
    p.add_argument("--block-steps", type=int, default=8, help="steps per decoder layer before the end-to-end steps")
    p.add_argument("--compare-steps", type=int, default=16,
                   help="end-to-end only (no block-wise phase, which uses the original too), KL against CE at "
                   "this many steps, every seed")
    p.add_argument("--compare-schemes", nargs="*", default=["W4A16 g64 sym"], choices=list(SCHEMES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lc-python", default=LC_PYTHON)
    p.add_argument("--train", nargs="+", default=None, choices=["scales", "zero_points", "rounding", "norms"],
                   help="what the W4A16 rows train (default: the recipe's default, scales zero_points norms)")
    p.add_argument("--results", default="self_distill",
                   help="name of the results files in benchmarks/results/ (NAME.json, NAME.md)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of an earlier run in the same results files (same machine and original)")
    p.add_argument("--quantize-only", action="store_true", help="only the quantized rows (no training)")
    args = p.parse_args()

    from llmquant.loading.demo import ensure_demo_model

    torch.manual_seed(0)
    demo = Path(ensure_demo_model(quiet=True))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=Path(__file__).parent).stdout.strip()
    ev = FolderEvaluator(demo, second_source(work))
    meta = {"original": ev.original, "machine": cpu_description(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "dtype": f"{EVAL_DTYPE} evaluation (training: bf16 autocast)",
            "python": sys.version.split()[0]}
    run = {"commit": commit + (" (uncommitted changes)" if dirty else ""), "date": time.strftime("%Y-%m-%d"),
           "command": "python " + shlex.join(sys.argv),
           "settings": {"schemes": args.schemes, "block_steps": args.block_steps, "tokens": args.tokens,
                        "batch_size": args.batch_size, "seq_len": args.seq_len, "budgets": args.budgets,
                        "compare_steps": args.compare_steps, "seeds": args.seeds, "train": args.train}}
    rows, meta["runs"] = earlier_rows(args.results, meta) if args.append else ([], [])
    meta["runs"].append(run)

    def add(row: dict) -> None:
        rows.append(row)
        write(rows, meta, args.results)
        print(f"{row['name']} {row.get('loss', '')} {row.get('steps', '')} seed {row.get('seed', '')}: corpus "
              f"{row['ppl_corpus']:.3f}, code {row['ppl_second']:.3f}, KL {row['kl_mean']:.4f}", flush=True)

    def trained(scheme: str, base_name: str, base_dir: Path, loss: str, block_steps: int, steps: int, seed: int):
        settings = dict(steps=steps, block_steps=block_steps, tokens=args.tokens, batch_size=args.batch_size,
                        seq_len=args.seq_len, loss=loss, seed=seed)
        if scheme == "FP8_DYNAMIC":
            settings["train"] = ["scales", "norms"]
        elif args.train:
            settings["train"] = args.train
        trains = "".join("_" + t for t in settings.get("train", []))
        out = work / f"{scheme}_sd_{loss}_{block_steps}_{steps}_{seed}{trains}".replace(" ", "_")
        result = self_distill_row(base_dir, out, demo, settings)
        add({"name": f"{base_name.split(' (')[0]} + self-distillation", "from": base_name, "loss": loss,
             "block_steps": block_steps, "steps": steps, "seed": seed, "tokens": args.tokens,
             "train": settings.get("train", "default"), **result, **ev.measure(out)})

    bases: dict[str, tuple[str, Path]] = {}
    for scheme in args.schemes:
        rtn_dir, base_dir = work / f"{scheme} RTN".replace(" ", "_"), work / scheme.replace(" ", "_")
        rtn_name = f"{scheme} RTN" if scheme != "FP8_DYNAMIC" else "FP8_DYNAMIC, no SmoothQuant"
        add(_quantized_row(ev, rtn_name, RTN[scheme], rtn_dir, demo, args.lc_python))
        if scheme == "FP8_DYNAMIC":
            # The default (SmoothQuant auto) for reference; self-distillation starts from the fast
            # no-SmoothQuant folder, so its time replaces the SmoothQuant search.
            add(_quantized_row(ev, "FP8_DYNAMIC (default: SmoothQuant auto)", SCHEMES[scheme], base_dir, demo,
                               args.lc_python))
            if Path(args.lc_python).exists():
                add(_quantized_row(ev, "llm-compressor FP8_DYNAMIC", {"llmcompressor": "FP8_DYNAMIC"},
                                   work / "lc_FP8_DYNAMIC", demo, args.lc_python))
            else:
                print(f"no llm-compressor at {args.lc_python}: run benchmarks/setup_llmcompressor.sh", file=sys.stderr)
            base_name, base_dir = rtn_name, rtn_dir
        else:
            base_name = f"{scheme} GPTQ"
            add(_quantized_row(ev, base_name, SCHEMES[scheme], base_dir, demo, args.lc_python))
        bases[scheme] = (base_name, base_dir)
        if args.quantize_only:
            continue
        for steps in args.budgets:
            trained(scheme, base_name, base_dir, "kl", args.block_steps, steps, args.seeds[0])
    # The teacher's effect last (every scheme's main rows are measured first).
    for scheme in args.compare_schemes if not args.quantize_only else []:
        if scheme in bases:
            for seed in args.seeds:
                for loss in ("kl", "ce"):
                    trained(scheme, *bases[scheme], loss, 0, args.compare_steps, seed)
    return 0


def _quantized_row(ev: FolderEvaluator, name: str, kwargs: dict, out: Path, demo: Path, lc_python: str) -> dict:
    if not (out / "config.json").is_file():
        seconds = quantize(kwargs, out, demo, lc_python)
    else:  # made by an earlier run of this script (same work folder): the time its report gives
        report = out / "quantization_report.json"
        seconds = json.loads(report.read_text())["timings_s"]["total"] if report.is_file() else None
    return {"name": name, "options": kwargs, "quantize_seconds": seconds, **ev.measure(out)}


if __name__ == "__main__":
    sys.exit(main())
