"""`llmquant eval suite FILE --output DIR`: thin flags over `eval.suite.run_suite`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_suite(metrics: argparse._SubParsersAction) -> None:
    parser = metrics.add_parser(
        "suite", help="run every model x task of a YAML suite; write results.json, report.md, plots",
        description="Run a suite file (see configs/eval/): every model (a source, a quantized variant made on the "
        "fly, a bitsandbytes baseline, or an OpenAI-compatible URL) times every task (perplexity, agreement, "
        "throughput, load). Writes DIR/results.json (with versions, CPU/GPU and threads), DIR/report.md (a table "
        "per task, deltas against the first model) and DIR/plots/*.png. Results already measured for unchanged "
        "inputs are reused unless --force; a failing model or task is recorded with its error and the rest runs.")
    parser.add_argument("file", type=Path, help="the suite YAML file")
    parser.add_argument("--output", type=Path, required=True, metavar="DIR", help="folder for results and reports")
    parser.add_argument("--force", action="store_true", help="measure everything again instead of reusing results")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_suite_command)


def run_suite_command(args: argparse.Namespace) -> int:
    from llmquant.eval.suite import run_suite

    results = run_suite(args.file, args.output, force=args.force, progress=not args.quiet)
    counts: dict[str, int] = {}
    for e in results["results"]:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    reused = sum(e.get("reused", False) for e in results["results"])
    print(f"suite {results['suite']['name']}: {counts.get('ok', 0)} ok, {counts.get('skipped', 0)} skipped, "
          f"{counts.get('error', 0)} failed ({reused} reused) in {results['seconds']:.0f} s")
    for e in results["results"]:
        if e["status"] == "error":
            print(f"  failed  {e['model']} / {e['task']}: {e['error'][:300]}")
    print(f"report     {args.output / 'report.md'}\nresults    {args.output / 'results.json'}")
    return 1 if counts.get("error") else 0


METRICS = [add_suite]
