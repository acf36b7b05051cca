"""Turn what the user typed (a Hub id, a folder, a .gguf file, or nothing) into a `ModelSource`.

Resolution order, chosen so that a typo never sends a local path to the Hub:

1. nothing (None) or "demo:SmolLM2-135M-Instruct": the built-in demo model;
2. an existing path: a model folder (config.json + weights) or a .gguf file;
3. text that looks like a path (starts with ".", "/" or "~", has more than one separator, or
   ends in a weights suffix) but does not exist: an error about the path, never a Hub lookup;
4. a valid Hub repository id ("org/name" or "name"): downloaded into the Hugging Face cache.

This module needs neither torch nor transformers: resolving a source is file and network work.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from llmquant.errors import (
    CorruptCheckpointError,
    InvalidConfigError,
    SourceNotFoundError,
)

# Suffixes that only ever name a file on disk, never a Hub repository.
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth")
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hub" | "local" | "gguf" | "demo"
    name: str  # as the user gave it (repo id, path), or "demo:SmolLM2-135M-Instruct"
    path: Path  # folder holding config.json etc.; for gguf the .gguf file itself
    revision: str | None  # for hub: the resolved commit hash; else None

    def describe(self) -> str:
        """One line naming the model for messages and reports."""
        if self.kind == "hub":
            return f"{self.name}@{self.revision[:7]}" if self.revision else self.name
        if self.kind == "demo":
            return self.name
        return str(self.path)


def resolve_source(source: str | os.PathLike | None = None, *, revision: str | None = None,
                   token: str | None = None, allow_pickle: bool = False) -> ModelSource:
    """Find (and for Hub ids, download) the model named by `source`.

    `token=None` lets huggingface_hub use HF_TOKEN or the saved login; `allow_pickle` widens a
    Hub download to pickle weights (pytorch_model*.bin) when the repository has no safetensors.
    """
    from llmquant.loading.demo import DEMO_ID, DEMO_NAME

    if source is None or (isinstance(source, str) and source == DEMO_ID):
        _reject_revision(revision, "the built-in demo model")
        return _demo_source(DEMO_ID, DEMO_NAME, announce=source is None)

    text = os.fspath(source)
    if not text.strip():
        raise SourceNotFoundError(
            "The model name is empty; pass a Hub id (org/name), a model folder or a .gguf file."
        )
    path = Path(text).expanduser()
    if path.exists():
        _reject_revision(revision, f"the local path {text}")
        return local_source(text, path.resolve())
    # A PathLike object is always meant as a path, whatever its text looks like.
    if not isinstance(source, str) or looks_like_path(text):
        raise SourceNotFoundError(
            f"The path {text} does not exist (resolved to {path.absolute()}). Check the spelling, or "
            "pass a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct to download a model."
        )
    if not is_hub_id(text):
        raise SourceNotFoundError(
            f"{text!r} is neither an existing path nor a valid Hugging Face Hub id. A Hub id looks like "
            "org/name (letters, digits, '-', '_', '.'); a local model is a folder with config.json "
            "and safetensors weights, or a .gguf file."
        )
    from llmquant.loading.hub import download_snapshot

    folder, commit = download_snapshot(text, revision=revision, token=token, allow_pickle=allow_pickle)
    return ModelSource(kind="hub", name=text, path=folder, revision=commit)


def looks_like_path(text: str) -> bool:
    """True for text the user clearly meant as a filesystem path rather than a Hub id."""
    if text.startswith((".", "/", "~", "\\")) or (len(text) > 1 and text[1] == ":"):
        return True
    separators = text.count("/") + (text.count(os.sep) if os.sep != "/" else 0)
    return separators > 1 or text.lower().endswith(_FILE_SUFFIXES)


def is_hub_id(text: str) -> bool:
    """The Hub's own rule for repository ids (huggingface_hub.utils.validate_repo_id)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _demo_source(demo_id: str, demo_name: str, announce: bool) -> ModelSource:
    from llmquant.loading.demo import ensure_demo_model

    if announce:
        print(f"Using the built-in demo model {demo_name} (pass a model to use another).", file=sys.stderr)
    return ModelSource(kind="demo", name=demo_id, path=ensure_demo_model(), revision=None)


def local_source(text: str, path: Path) -> ModelSource:
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource(kind="gguf", name=text, path=path, revision=None)
        hint = (f"pass the folder that holds it ({path.parent}) together with config.json and the "
                "tokenizer files" if path.suffix.lower() in _FILE_SUFFIXES else
                "pass a model folder (config.json, tokenizer, safetensors weights) or a .gguf file")
        raise InvalidConfigError(f"{path} is a single file, not a model: {hint}.")
    if not (path / "config.json").is_file():
        weights = sorted(p.name for g in _WEIGHT_GLOBS for p in path.glob(g))
        if weights:
            raise CorruptCheckpointError(
                f"The folder {path} has weights ({', '.join(weights[:3])}) but no config.json, so the "
                "architecture is unknown. Copy the config.json that belongs to these weights into the "
                "folder (it comes with the original model)."
            )
        raise InvalidConfigError(
            f"The folder {path} is not a model folder: it has no config.json and no weights. Pass the "
            "folder that holds config.json, the tokenizer files and model.safetensors."
        )
    return ModelSource(kind="local", name=text, path=path, revision=None)


def _reject_revision(revision: str | None, what: str) -> None:
    # Silently ignoring --revision would load something other than what the user asked for.
    if revision is not None:
        raise InvalidConfigError(
            f"--revision {revision} only applies to Hub ids, but the model is {what}. "
            "Drop --revision, or pass the Hub id instead."
        )
