"""The `llmquant` command: one subcommand per public function, each a thin layer of flags.

Errors the user can fix (`LLMQuantError`) print as one paragraph without a traceback and
exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import import_module
from typing import Iterable

from llmquant.cli.commands import COMMANDS
from llmquant.errors import LLMQuantError


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser with the full flags of `commands` (default: all of them); every other
    command is listed by name and one-line help only, which costs no import."""
    full = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(
        prog="llmquant",
        description="Quantize Hugging Face LLMs (INT8/INT4/FP8), save vLLM-loadable "
        "compressed-tensors checkpoints, measure what it cost, serve them, distill smaller students, "
        "and push them to the Hub.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library log messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, summary) in COMMANDS.items():
        if name in full:
            import_module(module).register(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def _command_named(argv: list[str]) -> str | None:
    # The first word that is not a flag picks the command (the only top-level flags are -v/-h).
    return next((word for word in argv if not word.startswith("-")), None)


def _quiet_libraries(verbose: bool, quiet: bool) -> None:
    # transformers and datasets are chatty at INFO/WARNING level about things our own
    # messages already cover; keep their warnings unless --verbose asks for more.
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    # transformers reads both variables when it is imported, so a command that fails before it
    # needs transformers (a port in use, a bad flag) never pays for importing it here.
    if not verbose:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    transformers = sys.modules.get("transformers")
    if transformers is not None:  # already imported (a caller of main() in the same process)
        if not verbose:
            transformers.logging.set_verbosity_error()
        if quiet:
            transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser([c for c in [_command_named(argv)] if c in COMMANDS])
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
