"""Flags shared by every subcommand that takes a model."""

from __future__ import annotations

import argparse

from llmquant.runtime import DTYPE_NAMES


def add_model_arguments(parser: argparse.ArgumentParser, positional: str = "model") -> None:
    parser.add_argument(
        positional, nargs="?", default=None,
        help="a Hub id (org/name), a local folder of safetensors (sharded too, or one of our "
        "quantized folders), or a .gguf file; omitted: the built-in demo model",
    )
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit (Hub ids only)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                        help="compute dtype (auto: bf16 on CUDA and bf16-capable CPUs, else fp32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    add_trust_flags(parser)


def add_trust_flags(parser: argparse.ArgumentParser) -> None:
    """--allow-pickle and --trust-remote-code: what a loaded source may run."""
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow loading pickle weights (.bin/.pt); they can run arbitrary code")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow running model code shipped in the repository")


def add_flags(parser: argparse.ArgumentParser, flags) -> None:
    """Declare the CLI spelling of each row of a flag table (llmquant/config/flags.py): help
    sections in the order they first appear, a flag and its opposite (--gptq / --no-gptq) on
    one dest, rows with the same `exclusive` id mutually exclusive."""
    sections: dict = {None: parser}  # help section title -> its argument group
    exclusive: dict = {}  # (section, exclusive id) -> its mutually exclusive group
    for flag in flags:
        if not flag.flags:
            continue
        if flag.group not in sections:
            sections[flag.group] = parser.add_argument_group(flag.group)
        where = sections[flag.group]
        if flag.exclusive is not None or flag.negative:
            key = (flag.group, flag.exclusive or flag.name)
            if key not in exclusive:
                exclusive[key] = where.add_mutually_exclusive_group()
            where = exclusive[key]
        where.add_argument(*flag.flags, dest=flag.name, default=flag.default(), help=flag.help, **flag.cli)
        if flag.negative:
            spelling, help_text = flag.negative
            where.add_argument(spelling, dest=flag.name, action="store_false", help=help_text)


def model_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of `llmquant.load_model` taken from the shared flags."""
    return dict(revision=args.revision, dtype=args.dtype, device=args.device,
                allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
