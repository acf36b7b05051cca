"""`llmquant prune [MODEL] --method sparsegpt --pattern 2:4 --output DIR`: flags over
`llmquant.prune(...)`, same names."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from llmquant.cli.commands import summary
from llmquant.cli.common import add_model_arguments

EPILOG = """\
methods:
  magnitude   keep the largest |W| (no data needed)
  wanda       keep the largest |W| x the input's norm, compared within each output row
  sparsegpt   choose and prune with error feedback on the calibration Hessian (OBS), so the kept
              weights absorb what the pruned ones did (default)
  admm        grow the mask gradually while solving for the kept weights by least squares
              (ADMM): the lowest error and perplexity, a few times SparseGPT's time

The checkpoint is dense (zeros stored in the model's dtype), so transformers, vLLM and llmquant
load it as they load the original; compressed-tensors' bitmask formats are not written, because
current compressed-tensors and vLLM no longer load them. N:M patterns (2:4) run faster only on
GPUs with sparse tensor cores and a kernel that uses them; on CPU, a pruned model runs at dense speed.

examples:
  llmquant prune --pattern 2:4 --output smol-24                  # demo model, SparseGPT 2:4
  llmquant prune org/model --method wanda --sparsity 0.5 --output model-wanda50
  llmquant quantize --scheme W4A16 --gptq --prune sparsegpt --sparsity-pattern 2:4 --output smol-24-w4
"""


def register(sub: argparse._SubParsersAction) -> None:
    from llmquant.config.sparsity import PRUNE_METHODS

    p = sub.add_parser("prune", help=summary("prune"), epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Set a fraction of each Linear layer's weights to zero (unstructured, or N:M such "
                       "as 2:4), save a dense checkpoint with a per-layer report, and check it against the "
                       "original on held-out text.")
    add_model_arguments(p)
    p.add_argument("-o", "--output", default=None, help="output folder (default: ./<model name>-<method>-<pattern>); "
                   "written atomically")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--method", default="sparsegpt", choices=PRUNE_METHODS, help="how weights are chosen (default sparsegpt)")
    p.add_argument("--pattern", default="unstructured", help="unstructured (default) or N:M, e.g. 2:4 or 4:8")
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured: fraction of weights set to zero (default 0.5)")
    p.add_argument("--iterations", type=int, default=20, help="admm: iterations per layer (default 20)")
    p.add_argument("--allocation", default="uniform", choices=("uniform", "outlier"),
                   help="uniform: every layer pruned to --sparsity (default); outlier: per decoder layer, "
                   "fewer zeros where more input-weighted weights are outliers (OWL), averaging to --sparsity")
    p.add_argument("--allocation-range", type=float, default=0.08,
                   help="outlier allocation: layer fractions span --sparsity +- this (default 0.08)")
    p.add_argument("--targets", nargs="+", default=["Linear"], help="layers pruned: names, class names or re:REGEX")
    p.add_argument("--ignore", nargs="+", default=["lm_head"], help="layers left dense (default lm_head)")
    p.add_argument("--dataset", default="builtin", help="calibration text: builtin, a .txt/.jsonl/.parquet file, "
                   "or a Hub dataset")
    p.add_argument("--text-field", default="text", help="column holding the text (jsonl/parquet/Hub)")
    p.add_argument("--num-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, default=0, help="which calibration windows are drawn")
    p.add_argument("--verify-tokens", type=int, default=2048,
                   help="held-out tokens compared with the original (0: no check)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def default_output(model: str | None, method: str, pattern: str, sparsity: float) -> Path:
    name = re.sub(r"\.gguf$", "", Path(str(model).rstrip("/")).name if model else "SmolLM2-135M-Instruct")
    what = pattern.replace(":", "of") if pattern != "unstructured" else f"{round(100 * sparsity)}pct"
    return Path.cwd() / f"{name}-{method}-{what}"


def run(args: argparse.Namespace) -> int:
    from llmquant.config.options import LoadOptions
    from llmquant.config.recipe import CalibrationConfig
    from llmquant.prune.api import prune

    output = args.output or default_output(args.model, args.method, args.pattern, args.sparsity)
    cal = CalibrationConfig(dataset=args.dataset, text_field=args.text_field, num_samples=args.num_samples,
                            seq_len=args.seq_len, seed=args.seed)
    load = LoadOptions(revision=args.revision, dtype=args.dtype, device=args.device, allow_pickle=args.allow_pickle,
                       trust_remote_code=args.trust_remote_code)
    result = prune(args.model, output, method=args.method, pattern=args.pattern, sparsity=args.sparsity,
                   targets=args.targets, ignore=args.ignore, calibration=cal, verify_tokens=args.verify_tokens,
                   overwrite=args.overwrite, progress=not args.quiet, load=load,
                   allocation=args.allocation, allocation_range=args.allocation_range,
                   **({"iterations": args.iterations} if args.method == "admm" else {}))
    r = result.report
    sp = r["sparsity"]
    spread = " (outlier allocation: per decoder layer, see the report)" if sp.get("allocation") == "outlier" else ""
    print(f"\n{sp['method']} {sp['pattern']}: {100 * sp['measured']:.2f}% of the weights of {sp['layers']} layers "
          f"are zero{spread}")
    for layer in r["layers"][:5]:
        o = f", output SQNR {layer['output_sqnr_db']:.1f} dB" if layer["output_sqnr_db"] is not None else ""
        print(f"  {layer['name']}: weight SQNR {layer['weight_sqnr_db']:.1f} dB{o}" + (f" ({layer['note']})" if layer["note"] else ""))
    if result.verification:
        v = result.verification
        print(f"verification (pruned vs original): mean KL {v['kl_mean']:.5f}, top-1 agreement "
              f"{100 * v['top1_agreement']:.2f}% over {v['tokens']} held-out tokens")
    print(f"saved {result.output_dir} in {result.seconds:.1f} s (report: {result.output_dir}/prune_report.md)")
    sys.stdout.flush()
    return 0
