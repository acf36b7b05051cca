"""`llmquant eval METRIC ...`: measure a model; one sub-subcommand per metric.

Each metric registers its own parser in `_METRICS`, so suites and throughput can be added
next to perplexity without touching the others.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from typing import TYPE_CHECKING, Callable

from llmquant.cli.commands import summary
from llmquant.cli import eval_measure_cmd, eval_suite_cmd
from llmquant.cli.common import add_model_arguments
from llmquant.cli.eval_flags import add_data_arguments, add_output_argument, check_output, eval_data_from_args, \
    write_output

if TYPE_CHECKING:
    from llmquant.eval.perplexity import PerplexityResult


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help=summary("eval"),
        description="Measure a model, quantized or not. Choose a metric.",
    )
    metrics = parser.add_subparsers(dest="metric", metavar="METRIC", required=True)
    for add_metric in _METRICS + eval_measure_cmd.METRICS + eval_suite_cmd.METRICS:
        add_metric(metrics)


def _add_perplexity(metrics: argparse._SubParsersAction) -> None:
    parser = metrics.add_parser(
        "perplexity", help="sliding-window perplexity on held-out text or a file of your own",
        description="Sliding-window perplexity (the transformers-guide method) on a file you name "
        "(all of it), or on the held-out split of the builtin corpus or a Hub dataset: text that "
        "calibration never uses. Each window scores only the tokens the previous window did not; "
        "the first token of each window has no context and is not scored. Also reports bits per "
        "byte, which does not depend on the tokenizer, and which part of the text was scored.",
    )
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument_group("memory (models larger than RAM or the GPU)").add_argument(
        "--stream", action="store_true",
        help="read the model one decoder layer at a time from its safetensors files, so that memory holds one "
        "layer's weights and the hidden states of all windows, not the model; same result, a folder or Hub "
        "id only (not .gguf or pickle weights)")
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true",
                        help="print the result as JSON on stdout instead of a summary")
    add_output_argument(parser, output)
    parser.set_defaults(handler=run_perplexity)


def run_perplexity(args: argparse.Namespace) -> int:
    check_output(args.output)
    from llmquant.eval import perplexity

    result = perplexity(args.model, eval_data_from_args(args), stream=args.stream, progress=True)
    document = json.dumps(result.to_dict(), indent=2)
    if args.json:
        print(document)
    else:
        print(format_summary(result))
    if args.output is not None:
        write_output(args.output, document)
        if not args.json:
            print(f"result     written to {args.output}")
    return 0


def format_summary(result: PerplexityResult) -> str:
    """A few aligned lines a person can read at a glance."""
    method = result.method
    window_ppl = sorted(_exp(nll) for nll in result.per_window)
    spread = (f"; per-window perplexity {window_ppl[0]:.2f} to {window_ppl[-1]:.2f}, "
              f"median {statistics.median(window_ppl):.2f}") if len(window_ppl) > 1 else ""
    lines = [
        f"perplexity {result.perplexity:.4f}  ({result.nll_per_token:.4f} nats/token, "
        f"{result.bits_per_byte:.4f} bits/byte)",
        f"model      {result.model} ({method['dtype']}, {method['device']})",
        f"text       {method['scored']}",
        f"scored     {result.num_tokens_scored:,} of {method['num_tokens']:,} tokens, "
        f"{result.num_bytes:,} bytes",
        f"method     {method['window']}-token windows, stride {method['stride']}, "
        f"{method['num_windows']} windows{spread}"
        + ("; model read one decoder layer at a time" if method.get("streamed") else ""),
        f"time       {result.seconds:.1f} s",
    ]
    return "\n".join(lines)


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


_METRICS: list[Callable[[argparse._SubParsersAction], None]] = [_add_perplexity]

