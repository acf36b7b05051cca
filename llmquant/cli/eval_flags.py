"""Flags the `llmquant eval` metrics share: which text, which windows, where the result goes.

`eval_data_from_args` is the one place the CLI turns flags into an `EvalData`; every metric that
scores text (perplexity, agreement, remote) calls it, so a data or window flag is added here once.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from llmquant.cli.common import model_kwargs
from llmquant.errors import InvalidConfigError

if TYPE_CHECKING:
    from llmquant.data.eval_data import EvalData

DATASET_HELP = (
    "text to evaluate on: 'builtin' (default; the English reference text shipped with Python, "
    "works offline), a local file (.txt/.md/.text or a text file without extension, "
    ".jsonl/.json, .parquet), or a Hub dataset as NAME or NAME:CONFIG (e.g. "
    "wikitext:wikitext-2-raw-v1; needs network or the local datasets cache)"
)
SPLIT_HELP = (
    "which part to score. Default: all of a file named with --dataset; the held-out last ~30%% of "
    "the builtin corpus (the text calibration never uses); a Hub dataset's 'test' split (else "
    "'validation'). 'held-out': the last ~30%% of a file too (when the model was calibrated on "
    "that file); 'all': every document; or a Hub split such as 'validation'"
)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def add_data_arguments(parser: argparse.ArgumentParser, batch_help: str = "windows per forward pass") -> None:
    """--dataset, --dataset-config, --text-field, --split, --max-tokens, --window, --stride, --batch-size."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="builtin", help=DATASET_HELP)
    data.add_argument("--dataset-config", default=None, metavar="CFG",
                      help="Hub dataset configuration (same as NAME:CFG in --dataset)")
    data.add_argument("--text-field", default="text", metavar="F",
                      help="column holding the text in .jsonl/.json/.parquet files and Hub datasets "
                      "(default: text)")
    data.add_argument("--split", default=None, help=SPLIT_HELP)
    data.add_argument("--max-tokens", type=positive_int, default=None, metavar="N",
                      help="evaluate only the first N tokens of that text (default: all)")
    windows = parser.add_argument_group("windows")
    windows.add_argument("--window", type=positive_int, default=None, metavar="W",
                         help="tokens per forward pass (default: the model's context, at most 1024)")
    windows.add_argument("--stride", type=positive_int, default=None, metavar="S",
                         help="tokens each window advances by (default: W, non-overlapping); "
                         "smaller gives scored tokens more context at W/S times the compute")
    windows.add_argument("--batch-size", type=positive_int, default=1, metavar="B",
                         help=f"{batch_help} (default: 1)")


def eval_data_from_args(args: argparse.Namespace) -> EvalData:
    """The `EvalData` the data, window and (where the command has them) model flags describe."""
    from llmquant.data.eval_data import EvalData

    options = dict(dataset=args.dataset, config_name=args.dataset_config, text_field=args.text_field,
                   split=args.split, max_tokens=args.max_tokens, window=args.window, stride=args.stride,
                   batch_size=args.batch_size)
    if hasattr(args, "dtype"):  # a command that loads its model here (not `eval remote`)
        options.update(model_kwargs(args))
    return EvalData.build(**options)


def add_output_argument(parser: argparse.ArgumentParser, group: argparse._ArgumentGroup | None = None) -> None:
    (group or parser.add_argument_group("output")).add_argument(
        "--output", type=Path, default=None, metavar="FILE", help="also write the result as JSON to FILE")


def check_output(path: Path | None) -> None:
    """Refuse an --output whose folder is missing before anything is measured."""
    if path is not None and not path.absolute().parent.is_dir():
        raise InvalidConfigError(f"--output {path}: the folder {path.absolute().parent} does not exist.")


def write_output(path: Path, document: str) -> None:
    try:
        path.write_text(document + "\n", encoding="utf-8")
    except OSError as e:
        raise InvalidConfigError(f"Could not write --output {path}: {e.strerror}.") from e
