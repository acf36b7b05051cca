"""`llmquant eval METRIC ...`: measure a model; one sub-subcommand per metric.

Each metric registers its own parser in `_METRICS`, so suites and throughput can be added
next to perplexity without touching the others.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from llmquant.cli.common import add_model_arguments, model_kwargs
from llmquant.errors import InvalidConfigError

if TYPE_CHECKING:
    from llmquant.eval.perplexity import PerplexityResult

_DATASET_HELP = (
    "text to evaluate on: 'builtin' (default; the English reference text shipped with Python, "
    "works offline), a local .txt/.jsonl/.json/.parquet file, or a Hub dataset as NAME or "
    "NAME:CONFIG (e.g. wikitext:wikitext-2-raw-v1; needs network or the local datasets cache)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="measure models: perplexity, agreement, throughput, load, suites",
        description="Measure a model, quantized or not. Choose a metric.",
    )
    from llmquant.cli import eval_measure_cmd, eval_suite_cmd

    metrics = parser.add_subparsers(dest="metric", metavar="METRIC", required=True)
    for add_metric in _METRICS + eval_measure_cmd.METRICS + eval_suite_cmd.METRICS:
        add_metric(metrics)


def _add_perplexity(metrics: argparse._SubParsersAction) -> None:
    parser = metrics.add_parser(
        "perplexity", help="sliding-window perplexity on held-out text",
        description="Sliding-window perplexity (the transformers-guide method) on the evaluation "
        "split of a dataset: text that calibration never uses. Each window scores only the "
        "tokens the previous window did not; the first token of each window has no context "
        "and is not scored. Also reports bits per byte, which does not depend on the tokenizer.",
    )
    add_model_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="builtin", help=_DATASET_HELP)
    data.add_argument("--dataset-config", default=None, metavar="CFG",
                      help="Hub dataset configuration (same as NAME:CFG in --dataset)")
    data.add_argument("--text-field", default="text", metavar="F",
                      help="column holding the text in .jsonl/.json/.parquet files and Hub datasets "
                      "(default: text)")
    data.add_argument("--split", default=None,
                      help="override the evaluation split: 'all' for every document of a file "
                      "(when calibration text is in a different file), or a Hub split such as "
                      "'validation'; default: Hub 'test' (else 'validation'), for files and the "
                      "builtin corpus the last ~30%% of documents")
    data.add_argument("--max-tokens", type=_positive_int, default=None, metavar="N",
                      help="evaluate only the first N tokens of the split (default: all)")
    windows = parser.add_argument_group("windows")
    windows.add_argument("--window", type=_positive_int, default=None, metavar="W",
                         help="tokens per forward pass (default: the model's context, at most 1024)")
    windows.add_argument("--stride", type=_positive_int, default=None, metavar="S",
                         help="tokens each window advances by (default: W, non-overlapping); "
                         "smaller gives scored tokens more context at W/S times the compute")
    windows.add_argument("--batch-size", type=_positive_int, default=1, metavar="B",
                         help="windows per forward pass (default: 1)")
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true",
                        help="print the result as JSON on stdout instead of a summary")
    output.add_argument("--output", type=Path, default=None, metavar="FILE",
                        help="also write the result as JSON to FILE")
    parser.set_defaults(handler=run_perplexity)


def run_perplexity(args: argparse.Namespace) -> int:
    if args.output is not None and not args.output.absolute().parent.is_dir():
        raise InvalidConfigError(
            f"--output {args.output}: the folder {args.output.absolute().parent} does not exist."
        )
    from llmquant.eval import perplexity

    result = perplexity(
        args.model, dataset=args.dataset, config_name=args.dataset_config,
        text_field=args.text_field, split=args.split, max_tokens=args.max_tokens,
        window=args.window, stride=args.stride, batch_size=args.batch_size, progress=True,
        **model_kwargs(args),
    )
    document = json.dumps(result.to_dict(), indent=2)
    if args.json:
        print(document)
    else:
        print(format_summary(result))
    if args.output is not None:
        try:
            args.output.write_text(document + "\n", encoding="utf-8")
        except OSError as e:
            raise InvalidConfigError(f"Could not write --output {args.output}: {e.strerror}.") from e
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
        f"data       {method['data']}",
        f"scored     {result.num_tokens_scored:,} of {method['num_tokens']:,} tokens, "
        f"{result.num_bytes:,} bytes",
        f"method     {method['window']}-token windows, stride {method['stride']}, "
        f"{method['num_windows']} windows{spread}",
        f"time       {result.seconds:.1f} s",
    ]
    return "\n".join(lines)


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


_METRICS: list[Callable[[argparse._SubParsersAction], None]] = [_add_perplexity]

