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
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow loading pickle weights (.bin/.pt); they can run arbitrary code")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow running model code shipped in the repository")


def model_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of `llmquant.load_model` taken from the shared flags."""
    return dict(revision=args.revision, dtype=args.dtype, device=args.device,
                allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
