"""The `llmquant` command: one subcommand per public function, each a thin layer of flags.

Errors the user can fix (`LLMQuantError`) print as one paragraph without a traceback and
exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from llmquant.errors import LLMQuantError


def build_parser() -> argparse.ArgumentParser:
    from llmquant.cli import distill_cmd, eval_cmd, push_cmd, quantize_cmd, serve_cmd

    parser = argparse.ArgumentParser(
        prog="llmquant",
        description="Quantize Hugging Face LLMs (INT8/INT4/FP8), save vLLM-loadable "
        "compressed-tensors checkpoints, measure what it cost, serve them, distill smaller students, "
        "and push them to the Hub.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library log messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    quantize_cmd.register(sub)
    eval_cmd.register(sub)
    serve_cmd.register(sub)
    distill_cmd.register(sub)
    push_cmd.register(sub)
    return parser


def _quiet_libraries(verbose: bool, quiet: bool) -> None:
    # transformers and datasets are chatty at INFO/WARNING level about things our own
    # messages already cover; keep their warnings unless --verbose asks for more.
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import transformers

        transformers.logging.set_verbosity_error()
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries(args.verbose, getattr(args, "quiet", False))
    try:
        return int(args.handler(args) or 0)
    except LLMQuantError as e:
        # One paragraph, not hard-wrapped: the terminal wraps it, and commands or paths in the
        # message stay intact for copying.
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing was written to the output folder.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
