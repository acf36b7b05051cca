"""`llmquant quantize`: flags over `llmquant.quantize(...)`, same names.

The flags are the rows of llmquant/config/flags.py; `run` only sorts them into a Recipe and the
option objects and calls `quantize`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from llmquant.cli.commands import summary
from llmquant.cli.common import add_flags, add_model_arguments
from llmquant.config.flags import LOAD, QUANTIZE_FLAGS, RECIPE, RUN, VERIFY, build_recipe, options, split_keywords

EPILOG = """\
schemes:
  W8A16        INT8 weights per output channel
  W4A16        INT4 weights per group (default; group 128, or 64/32 when the model's widths
               need it; mse clipping search)
  W4A16_ASYM   INT4 weights per group with zero points (better INT4 quality; vLLM loads it,
               transformers not yet: see README)
  W8A8         INT8 weights per channel + INT8 activations (dynamic per token; --activations
               static), after SmoothQuant (--no-smoothquant to skip it)
  FP8          FP8 E4M3 weights per tensor + activations static per tensor (calibrated)
  FP8_DYNAMIC  FP8 weights per channel + activations dynamic per token, after SmoothQuant
  FP8_W        FP8 weights per channel, activations in the model dtype

examples:
  llmquant quantize --scheme W4A16 --group-size 64 --observer mse --output smol-w4a16
  llmquant quantize org/model --scheme FP8 --observer percentile --percentile 99.99 --output out/
  llmquant quantize --scheme W4A16 --group-size 64 --gptq --output smol-w4a16-gptq
  llmquant quantize --scheme W4A16 --group-size 64 --gptq --target-bits 5 --output smol-mixed
  llmquant quantize --scheme W4A16 --gptq --output out/ --resume   # continue an interrupted run
  llmquant quantize --scheme W8A8 --gptq --output smol-w8a8-gptq   # SmoothQuant, then GPTQ
  llmquant quantize ./my-model --recipe configs/quant/w8a8.yaml --output out/
  llmquant quantize org/model --scheme W8A8 --output out/ --push-to-hub me/model-W8A8
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help=summary("quantize"),
        description="Quantize a model's Linear layers and save a checkpoint that vLLM, transformers "
        "and llmquant load. Prints a per-layer error report and checks the saved folder against the "
        "original model on held-out text.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_flags(p, QUANTIZE_FLAGS)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def default_output(model: str | None, scheme: str) -> Path:
    name = Path(str(model).rstrip("/")).name if model else "SmolLM2-135M-Instruct"
    name = re.sub(r"\.gguf$", "", name)
    return Path.cwd() / f"{name}-{scheme}"


def run(args: argparse.Namespace) -> int:
    from llmquant.quant.pipeline.quantize import quantize

    values = {flag.name: getattr(args, flag.name) for flag in QUANTIZE_FLAGS if flag.name != "progress"}
    values["progress"] = not args.quiet
    if values["output"] is None:
        values["output"] = default_output(args.model, args.scheme or (Path(args.recipe).stem if args.recipe
                                                                     else "W4A16"))
    given = split_keywords(values)
    result = quantize(args.model, build_recipe(**given[RECIPE]), load=options(LOAD, **given[LOAD]),
                      verification=options(VERIFY, **given[VERIFY]), run=options(RUN, **given[RUN]))
    report = result.report
    print(f"\n{result.recipe.name}: {result.recipe.scheme.describe()}")
    for line in report.summary_lines(warnings=False):
        print(line)
    if result.verification is not None:
        print(f"verification (reloaded checkpoint vs original): {result.verification.describe()}")
    size = f", {report.checkpoint_bytes / 1e6:.1f} MB" if report.checkpoint_bytes else ""
    print(f"saved {result.output_dir}{size} in {result.seconds:.1f} s "
          f"(per-layer report: {result.output_dir}/quantization_report.md)")
    if result.push is not None:
        from llmquant.cli.push_cmd import print_result

        print_result(result.push)
    for line in report.warnings():  # last, where it is seen
        print(line)
    sys.stdout.flush()
    return 0
