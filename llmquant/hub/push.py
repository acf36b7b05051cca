"""`llmquant.push(...)`: publish a model folder to the Hugging Face Hub in one commit, with a
model card that carries the recipe and the measured results.

    import llmquant
    llmquant.push("out/", "me/SmolLM2-135M-Instruct-W4A16", private=True)

The upload goes through `huggingface_hub` unchanged: HF_TOKEN (or the saved login), HF_ENDPOINT
(a private Hub mirror), Xet or Git LFS storage for the weights as the client decides. The
folder is checked exactly as `load_model` checks it before anything is sent, so a folder
that would not load is never published.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from llmquant.errors import (
    HubPushError,
    HubUnreachableError,
    InvalidConfigError,
    LLMQuantError,
    SourceNotFoundError,
)
from llmquant.hub.card_facts import CARD_FILE, RELATIONS, CardFacts
from llmquant.hub.model_card import build_model_card
from llmquant.hub.push_errors import PushStep, push_errors


@dataclass
class PushFile:
    path_in_repo: str
    size: int


@dataclass
class PushResult:
    repo_id: str
    files: list[PushFile]
    card: str  # the README.md that is (or would be) published
    card_action: str  # "generated" | "regenerated" | "kept"
    dry_run: bool
    endpoint: str
    revision: str | None = None
    commit_url: str | None = None
    commit_oid: str | None = None
    pr_url: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def check_push_target(repo_id: str, token: str | None = None) -> str:
    """Validate `repo_id` and find a token, without any network access; returns the token.

    Commands that push at the end of long work (quantize, distill) call this first, so that a
    typo or a missing login fails in a second, not after the work."""
    _check_repo_id(repo_id)
    from huggingface_hub import constants

    from llmquant.loading.hub_errors import is_offline

    if is_offline(constants):
        raise HubUnreachableError(f"HF_HUB_OFFLINE=1 forbids any upload; unset it to push {repo_id} "
                                  "(--dry-run shows what would be pushed without network).")
    token = token or _saved_token()
    if not token:
        raise HubPushError(
            f"No Hugging Face token to push {repo_id} with. Set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens), or run `hf auth login`.")
    return token


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         create_pr: bool = False, commit_message: str | None = None, dry_run: bool = False,
         overwrite_card: bool = False, base_model: str | None = None, relation: str | None = None,
         license: str | None = None, token: str | None = None, endpoint: str | None = None,
         allow_pickle: bool = False, trust_remote_code: bool = False) -> PushResult:
    """Upload `folder` to the Hub repository `repo_id` (created if missing) in one commit.

    A README.md model card is generated when the folder has none (or with `overwrite_card`) and
    written into the folder. `revision` pushes to that branch (created from main if missing);
    `create_pr` opens a pull request against it instead of committing. `dry_run` returns the
    file list and the card without any network access. `base_model`, `relation`
    ("quantized"/"distillation") and `license` override what the folder's files say.
    `token` defaults to HF_TOKEN or the saved login, `endpoint` to HF_ENDPOINT.
    """
    folder = Path(folder).expanduser()
    _check_repo_id(repo_id)
    if relation is not None and relation not in RELATIONS:
        raise InvalidConfigError(f"relation must be one of {', '.join(RELATIONS)}; got {relation!r}.")
    check_loadable(folder, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)

    card_path = folder / CARD_FILE
    card_action = "kept" if card_path.is_file() and not overwrite_card else \
        ("regenerated" if card_path.is_file() else "generated")
    card, facts = build_model_card(folder, repo_id, base_model=base_model, relation=relation, license=license)
    notes: list[str] = []
    if card_action == "kept":
        card = card_path.read_text(encoding="utf-8", errors="replace")
    else:
        notes += _card_notes(facts)
    files = _listing(folder)
    if card_action != "kept":
        files = [f for f in files if f.path_in_repo != CARD_FILE] + [PushFile(CARD_FILE, len(card.encode("utf-8")))]
    from huggingface_hub import constants

    result = PushResult(repo_id=repo_id, files=files, card=card, card_action=card_action, dry_run=dry_run,
                        endpoint=(endpoint or constants.ENDPOINT).rstrip("/"), revision=revision, notes=notes)
    if dry_run:
        return result
    token = check_push_target(repo_id, token)
    if card_action != "kept":
        _write_card(card_path, card)
    _upload(folder, result, token, private=private, create_pr=create_pr,
            commit_message=commit_message or _default_message(facts))
    return result


def check_loadable(folder: Path, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> None:
    """The checks `load_model` runs on a folder, plus loading its tokenizer: refuse to publish
    what would not load, saying why."""
    from llmquant.loading.load import check_model_folder, load_tokenizer
    from llmquant.loading.sources import local_source

    if not folder.is_dir():
        raise SourceNotFoundError(f"{folder} is not a folder: pass the model folder to push "
                                  "(config.json, tokenizer, safetensors weights).")
    try:
        source = local_source(str(folder), folder.resolve())
        where = f"The folder {source.path}"
        check_model_folder(source.path, where, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        load_tokenizer(source.path, trust_remote_code)
    except LLMQuantError as e:
        raise type(e)(f"Not pushing: {e}") from None


def _upload(folder: Path, result: PushResult, token: str, *, private: bool, create_pr: bool,
            commit_message: str) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=result.endpoint, token=token)
    step = PushStep()
    with push_errors(result.repo_id, result.endpoint, token, result.revision, step):
        step.doing = "creating the repository"
        api.create_repo(result.repo_id, private=private, exist_ok=True, repo_type="model")
        if result.revision and not create_pr:
            step.doing = f"creating the branch {result.revision}"
            api.create_branch(result.repo_id, branch=result.revision, exist_ok=True, repo_type="model")
        step.doing = "uploading the files"
        operations = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(folder / f.path_in_repo))
                      for f in result.files]
        info = api.create_commit(result.repo_id, operations, commit_message=commit_message,
                                 revision=result.revision, create_pr=create_pr, repo_type="model")
    result.commit_url, result.commit_oid, result.pr_url = info.commit_url, info.oid, info.pr_url


def _listing(folder: Path) -> list[PushFile]:
    """Every file under `folder`, skipping hidden ones (.git, .cache, editor files)."""
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        files.append(PushFile(rel.as_posix(), path.stat().st_size))
    return files


def _write_card(card_path: Path, card: str) -> None:
    """Write README.md atomically: a crash never leaves half a card that a later push would keep."""
    tmp = card_path.with_name(f".{CARD_FILE}.tmp-{os.getpid()}")
    tmp.write_text(card, encoding="utf-8")
    os.replace(tmp, card_path)


def _card_notes(facts: CardFacts) -> list[str]:
    notes = list(facts.notes)
    if not facts.base_model:
        notes.append("the base model is unknown (the folder was not made from a Hub model): pass --base-model "
                     "ORG/NAME to link the card to it")
    if not facts.license:
        notes.append("the license is unknown: pass --license (the source model's license, e.g. apache-2.0)")
    return notes


def _default_message(facts: CardFacts) -> str:
    from llmquant import __version__

    what = f"{facts.scheme} checkpoint" if facts.scheme else "model"
    return f"Upload {what} with llmquant {__version__}"


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InvalidConfigError(f"{repo_id!r} is not a valid Hub repository id: {e}") from None
    if repo_id.count("/") != 1:
        raise InvalidConfigError(
            f"{repo_id!r}: name the repository as NAMESPACE/NAME, where NAMESPACE is your Hub user name or "
            "an organization you can write to.")


def _saved_token() -> str | None:
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception:  # noqa: BLE001 - an unusable saved login is the same as none here
        return None
