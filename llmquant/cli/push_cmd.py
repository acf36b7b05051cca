"""`llmquant push DIR REPO_ID`: flags over `llmquant.push(...)`, same names."""

from __future__ import annotations

import argparse
import sys

from llmquant.cli.commands import summary
from llmquant.hub.card_facts import RELATIONS

EPILOG = """\
The token comes from HF_TOKEN or the saved login (`hf auth login`) and is never printed;
HF_ENDPOINT points the upload at another Hub (a private mirror). Weights go through Xet or
Git LFS as huggingface_hub decides (HF_HUB_DISABLE_XET=1 forces Git LFS, for a mirror
without Xet storage).

examples:
  llmquant push out/ me/SmolLM2-135M-Instruct-W4A16 --dry-run     # files, sizes and the card; no network
  llmquant push out/ me/SmolLM2-135M-Instruct-W4A16 --private
  llmquant push out/ org/model-W8A8 --create-pr --commit-message "W8A8 checkpoint"
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push", help=summary("push"),
        description="Upload a model folder (a quantized or distilled checkpoint) to a Hub repository in one "
        "commit, creating the repository if needed. Writes a model card (README.md) when the folder has "
        "none: Hub metadata, the recipe, calibration, verification and the evaluation results found in "
        "the folder, and how to run the model with vLLM, transformers and llmquant serve. The folder is "
        "checked as the loader checks it first: a folder that would not load is not pushed.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="DIR", help="the model folder (e.g. the output of llmquant quantize)")
    p.add_argument("repo_id", metavar="REPO_ID", help="the Hub repository, NAMESPACE/NAME")
    p.add_argument("--private", action="store_true", help="create the repository as private (if it is new)")
    p.add_argument("--revision", default=None, metavar="BRANCH",
                   help="push to this branch (created from main if missing); with --create-pr, the branch the "
                   "pull request targets")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message", default=None, help="commit (or pull request) title")
    p.add_argument("--dry-run", action="store_true",
                   help="print the files with their sizes and the model card; no network access, nothing written")
    card = p.add_argument_group("model card")
    card.add_argument("--overwrite-card", action="store_true",
                      help="replace the folder's README.md with a generated card (default: keep it)")
    card.add_argument("--base-model", default=None, metavar="ORG/NAME",
                      help="the Hub model this one was made from (default: the source recorded in the folder)")
    card.add_argument("--relation", choices=RELATIONS, default=None,
                      help="how it was made from the base model (default: quantized for a quantized folder)")
    card.add_argument("--license", default=None, help="license id, e.g. apache-2.0 (default: the source model's)")
    p.add_argument("--allow-pickle", action="store_true", help="accept a folder with pickle weights only")
    p.add_argument("--trust-remote-code", action="store_true", help="accept a folder whose model needs custom code")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from llmquant.hub.push import push

    result = push(args.folder, args.repo_id, private=args.private, revision=args.revision,
                  create_pr=args.create_pr, commit_message=args.commit_message, dry_run=args.dry_run,
                  overwrite_card=args.overwrite_card, base_model=args.base_model, relation=args.relation,
                  license=args.license, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    print_result(result)
    return 0


def print_result(result) -> None:
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    target = f"{result.repo_id} at {result.endpoint}" + (f", branch {result.revision}" if result.revision else "")
    if result.dry_run:
        print(f"dry run: would push {len(result.files)} files, {_size(result.total_bytes)}, to {target}:")
        for f in result.files:
            print(f"  {_size(f.size):>10}  {f.path_in_repo}")
        card = {"kept": "the folder's own", "generated": "generated", "regenerated": "regenerated"}[result.card_action]
        print(f"\n--- {'README.md'} ({card} model card) ---")
        print(result.card, end="")
        return
    if result.card_action != "kept":
        print(f"wrote the model card {result.card_action} into the folder: README.md")
    print(f"pushed {len(result.files)} files, {_size(result.total_bytes)}, to {target}")
    if result.pr_url:
        print(f"pull request: {result.pr_url}")
    print(f"commit: {result.commit_url}")
    sys.stdout.flush()


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
