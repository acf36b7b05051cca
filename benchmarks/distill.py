"""Distillation on the demo model: does knowledge distillation recover what layer dropping cost?

Teacher: the demo model (SmolLM2-135M-Instruct, 30 layers). Student: its 15 most important
layers (1 - cos(in, out) on training text), weights copied. Every trained row uses the same
steps, the same windows of the built-in corpus's training split in the same order, the same
optimizer and schedule; only the loss differs. Perplexity of every row is measured the same
way: the saved folder reloaded by `eval.perplexity` (llmquant's runtime; bf16 on this CPU) on
the first --eval-tokens tokens of the held-out split, which training never sees.

    (a) teacher  (b) student right after pruning  (c) + cross-entropy-only training
    (d) + KD (forward KL on the teacher's offline top-k log-probs, mixed with CE)
    (e) + KD with quantization-aware training (W4A16 group 64), exported through llmquant.quantize
    (d') the KD student quantized after training with the same scheme (no QAT), for comparison

    python benchmarks/distill.py                  # defaults sized for < 30 min on 2 CPU cores

Writes benchmarks/results/distill.{json,md} after every row.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def ppl(folder, eval_tokens: int) -> dict:
    from llmquant.eval import perplexity

    r = perplexity(folder, max_tokens=eval_tokens, progress=False)
    return {"perplexity": r.perplexity, "eval_seconds": r.seconds, "eval_dtype": r.method["dtype"]}


def write(meta: dict, rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    by = {r["row"][:3]: r for r in rows}
    a, b = by.get("(a)"), by.get("(b)")
    summary = {}
    if a and b:
        # Recovered share of the (b) - (a) gap, in perplexity and in log-perplexity (NLL per token):
        # when pruning multiplies perplexity a thousandfold, any training closes almost all of the
        # perplexity gap, and the NLL gap is the stricter measure.
        gap = b["perplexity"] - a["perplexity"]
        nll_gap = math.log(b["perplexity"]) - math.log(a["perplexity"])
        for r in rows:
            r["gap_recovered"] = (b["perplexity"] - r["perplexity"]) / gap if gap else None
            r["nll_gap_recovered"] = ((math.log(b["perplexity"]) - math.log(r["perplexity"])) / nll_gap
                                      if nll_gap else None)
        c, d = by.get("(c)"), by.get("(d)")
        if c and d:
            summary = {"kd_beats_ce": d["perplexity"] < c["perplexity"],
                       "kd_recovers_half_the_gap": d["gap_recovered"] >= 0.5,
                       "kd_gap_recovered": d["gap_recovered"], "ce_gap_recovered": c["gap_recovered"],
                       "kd_nll_gap_recovered": d["nll_gap_recovered"],
                       "ce_nll_gap_recovered": c["nll_gap_recovered"]}
    (RESULTS / "distill.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1),
                                          encoding="utf-8")
    lines = ["# Distillation on the demo model (SmolLM2-135M-Instruct, 30 -> 15 layers)", "",
             f"Student: the 15 most important of 30 decoder layers (1 - cos(in, out) on training text), "
             f"{meta.get('student_params_m', 0):.1f}M parameters vs {meta['teacher_params_m']:.1f}M. Training: "
             f"{meta['steps']} optimizer steps of {meta['batch_size']} x {meta['seq_len']} tokens "
             f"({meta['steps'] * meta['batch_size'] * meta['seq_len']:,} tokens) from the built-in corpus's "
             f"training split, AdamW lr {meta['lr']:g}, cosine with {meta['warmup']} warm-up steps, bf16 autocast; "
             "the same windows in the same order for every trained row. KD: "
             f"{meta['kd']}. Perplexity: the first {meta['eval_tokens']:,} tokens of the held-out split "
             "(window 1024), each saved folder reloaded by llmquant's runtime.", "",
             "| row | perplexity | gap recovered (perplexity) | gap recovered (log-perplexity) | train s/step "
             "| command |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        shown = r["row"][:3] not in ("(a)", "(b)")
        rec_s = f"{100 * r['gap_recovered']:.1f}%" if shown and r.get("gap_recovered") is not None else ""
        nll_s = f"{100 * r['nll_gap_recovered']:.1f}%" if shown and r.get("nll_gap_recovered") is not None else ""
        sps = f"{r['seconds_per_step']:.2f}" if r.get("seconds_per_step") else ""
        lines.append(f"| {r['row']} | {r['perplexity']:.3f} | {rec_s} | {nll_s} | {sps} | `{r['command']}` |")
    if summary:
        lines += ["", f"KD beats cross-entropy-only at equal steps: **{'yes' if summary['kd_beats_ce'] else 'no'}**. "
                  f"KD recovers {100 * summary['kd_gap_recovered']:.1f}% of the (b) - (a) perplexity gap "
                  f"(CE only: {100 * summary['ce_gap_recovered']:.1f}%); target at least 50%: "
                  f"**{'met' if summary['kd_recovers_half_the_gap'] else 'not met'}**. In log-perplexity "
                  f"(NLL per token) KD recovers {100 * summary['kd_nll_gap_recovered']:.1f}% of the gap "
                  f"(CE only: {100 * summary['ce_nll_gap_recovered']:.1f}%)."]
    lines += ["", f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads. "
              f"Whole run: {meta.get('total_seconds', 0) / 60:.1f} min. Date {meta['date']}.", ""]
    (RESULTS / "distill.md").write_text("\n".join(lines), encoding="utf-8")


def main() -> int:
    global RESULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--scheme", default="W4A16")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--teacher", default=None, help="another teacher folder (default: the demo model)")
    p.add_argument("--student-layers", type=int, default=15)
    p.add_argument("--results", type=Path, default=Path(__file__).parent / "results", help="where distill.{json,md} go")
    p.add_argument("--render", action="store_true", help="only rewrite distill.md from distill.json")
    args = p.parse_args()
    command = "python " + " ".join(sys.argv)
    if args.render:
        RESULTS = args.results
        data = json.loads((RESULTS / "distill.json").read_text(encoding="utf-8"))
        write(data["meta"], data["rows"])
        print((RESULTS / "distill.md").read_text())
        return 0

    import llmquant
    from llmquant.distill.export import save_student
    from llmquant.distill.student import make_student
    from llmquant.distill.data import training_windows
    from llmquant.loading.demo import ensure_demo_model

    t_start = time.perf_counter()
    RESULTS = args.results
    demo = Path(args.teacher) if args.teacher else ensure_demo_model(quiet=True)
    teacher = llmquant.load_model(demo)
    common = dict(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                  mixed_precision="bf16", seed=0, student_layers=args.student_layers, progress=True)
    kd = dict(kd_weight=0.9, divergence="forward_kl", temperature=1.0, teacher_mode="offline", top_k=args.top_k)
    meta = {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
            "warmup": 10, "eval_tokens": args.eval_tokens,
            "kd": f"0.9 x forward KL (T = 1) on the teacher's top-{args.top_k} log-probs (offline cache) "
                  "+ 0.1 x CE",
            "teacher_params_m": sum(p.numel() for p in teacher.model.parameters()) / 1e6,
            "machine": f"{platform.machine()}, {llmquant.runtime.describe_device()}",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    rows: list[dict] = []

    def add(row: str, folder, extra: dict | None = None) -> None:
        rows.append({"row": row, **ppl(folder, args.eval_tokens), **(extra or {}), "command": command})
        meta["total_seconds"] = time.perf_counter() - t_start
        write(meta, rows)
        print(f"{row}: perplexity {rows[-1]['perplexity']:.3f}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="distill-bench-") as tmp:
        tmp = Path(tmp)
        add("(a) teacher, 30 layers", demo)

        windows = training_windows(teacher.tokenizer, seq_len=args.seq_len)
        pruned, plan = make_student(teacher.model, windows[:16], num_layers=args.student_layers)
        meta["student_params_m"] = sum(p.numel() for p in pruned.parameters()) / 1e6
        meta["kept_layers"], meta["layer_importance"] = plan.kept_layers, plan.layer_importance
        save_student(pruned, teacher.tokenizer, tmp / "b", storage_dtype=torch.bfloat16, overwrite=False, files={})
        del pruned
        add(f"(b) student after pruning ({args.student_layers} layers by importance)", tmp / "b")

        runs = [("(c) + cross-entropy-only training", "c", dict(kd_weight=0.0)),
                ("(d) + KD", "d", dict(kd, teacher_cache=str(tmp / "cache"))),
                (f"(e) + KD with QAT {args.scheme} g{args.group_size}, quantized", "e",
                 dict(kd, teacher_cache=str(tmp / "cache"), qat_scheme=args.scheme, qat_group_size=args.group_size))]
        for row, name, kw in runs:
            result = llmquant.distill(teacher, output=tmp / name, **common, **kw)
            add(row, tmp / name, {"seconds_per_step": result.seconds_per_step,
                                  "train_seconds": result.timings_s["train"],
                                  "final_loss": result.history[-1]["loss"], "history": result.history,
                                  "quantization": result.quantization})
            if name == "d":
                q = llmquant.quantize(tmp / "d", output=tmp / "d_ptq", scheme=args.scheme, group_size=args.group_size,
                                      observer="minmax", verify=False, progress=False)
                add(f"(d') KD student, then {args.scheme} g{args.group_size} minmax (no QAT)", q.output_dir)
    meta["total_seconds"] = time.perf_counter() - t_start
    write(meta, rows)
    print((RESULTS / "distill.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
