"""Translate huggingface_hub's exceptions into our errors, each saying what to do next.

The token is never part of a message: we never format it, and any text taken from an underlying
exception is scrubbed of it in case a server echoes it back.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Iterator

from llmquant.errors import (
    AccessDeniedError,
    CorruptCheckpointError,
    LLMQuantError,
    OfflineCacheMissError,
    SourceNotFoundError,
)


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None, token: str | None) -> Iterator[None]:
    """Run a Hub download; re-raise its failures as LLMQuantError subclasses."""
    try:
        yield
    except LLMQuantError:
        raise
    except Exception as e:  # noqa: BLE001 - translated below, or re-raised unchanged
        translated = translate_hub_error(e, repo_id, revision, token)
        if translated is None:
            raise
        raise translated from None


def translate_hub_error(error: BaseException, repo_id: str, revision: str | None,
                        token: str | None) -> LLMQuantError | None:
    """Our error for a huggingface_hub failure, or None when it is not one we know."""
    from huggingface_hub import constants

    hub = hub_error_classes()

    endpoint = constants.ENDPOINT
    page = f"{endpoint}/{repo_id}"
    has_token = _token_in_use(token)
    rev = revision or "main"

    def scrub(text: object) -> str:
        return redact(str(text).strip().splitlines()[0] if str(text).strip() else "", token)

    if isinstance(error, hub.GatedRepoError):  # before RepositoryNotFoundError: it is a subclass
        state = ("the token in use has not been granted access yet (approval can take a while)"
                 if has_token else "no access token was sent")
        return AccessDeniedError(
            f"The Hub repository {repo_id} is gated: its authors require you to accept their license "
            f"first, and {state}. Open {page}, log in and accept the terms, then create a read token "
            "at https://huggingface.co/settings/tokens and set it as HF_TOKEN (or run `hf auth login`)."
        )
    if isinstance(error, hub.RepositoryNotFoundError):
        private = ("the token in use has no access to it" if has_token
                   else "no access token was sent (set HF_TOKEN)")
        return SourceNotFoundError(
            f"The Hub has no repository {repo_id} at {endpoint}, or it is private and {private}. Check "
            "the spelling (org/name, as in the model page's URL); if it is a local folder, pass its "
            "path starting with ./ or /."
        )
    if isinstance(error, hub.RevisionNotFoundError):
        return SourceNotFoundError(
            f"Revision {rev!r} not found in the Hub repository {repo_id}. Pass a branch, tag or commit "
            f"that exists (see {page}/tree/main), or drop --revision to use the default branch."
        )
    if isinstance(error, hub.DisabledRepoError):
        return AccessDeniedError(f"The Hub repository {repo_id} has been disabled by the Hub; it cannot "
                                 "be downloaded. Use another copy of the model.")
    if isinstance(error, hub.RemoteEntryNotFoundError):
        return CorruptCheckpointError(
            f"The Hub repository {repo_id} (revision {rev}) lists a file that it does not serve: "
            f"{scrub(error)}. Its weight index probably refers to a shard that was never uploaded; "
            "use another revision or copy of the model."
        )
    if isinstance(error, hub.HfHubHTTPError) and getattr(error, "response", None) is not None \
            and error.response.status_code in (401, 403):
        status = error.response.status_code
        reason = ("the access token is missing, invalid or expired" if status == 401
                  else "the access token lacks the permission to read it (a fine-grained token needs "
                  "read access to this repository, or to public gated repositories)")
        return AccessDeniedError(
            f"The Hub refused access to {repo_id} (HTTP {status}): {reason}. Create a read token at "
            "https://huggingface.co/settings/tokens and set it as HF_TOKEN (or run `hf auth login`)."
        )
    if isinstance(error, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled)):
        # IncompleteSnapshotError is a LocalEntryNotFoundError too: a partial cached copy.
        snapshot = _cached_snapshot(constants.HF_HUB_CACHE, repo_id, rev)
        in_cache = (f"its cached copy ({snapshot}) is incomplete" if snapshot is not None
                    else f"it is not in the local Hugging Face cache ({constants.HF_HUB_CACHE})")
        cause = error.__cause__ or error.__context__
        if is_offline(constants) or isinstance(error, hub.OfflineModeIsEnabled) \
                or isinstance(cause, hub.OfflineModeIsEnabled):
            return OfflineCacheMissError(
                f"{repo_id} (revision {rev}): {in_cache}, and HF_HUB_OFFLINE=1 forbids downloading. "
                f"Run once with network access (unset HF_HUB_OFFLINE), or `hf download {repo_id}` on a "
                "machine that has network and copy the cache (HF_HOME), or pass a local model folder."
            )
        if isinstance(cause, hub.HfHubHTTPError) and getattr(cause, "response", None) is not None:
            reason = f"it answered HTTP {cause.response.status_code}"
            advice = "Try again later"
        else:
            reason = scrub(cause) if cause is not None else scrub(error)
            advice = "Check the network, proxy and HF_ENDPOINT"
        return OfflineCacheMissError(
            f"Cannot reach the Hub at {endpoint} to download {repo_id} ({reason}), and {in_cache}. "
            f"{advice}; on a machine without network set HF_HUB_OFFLINE=1 to use the cache only "
            "(after filling it elsewhere), or pass a local model folder."
        )
    if is_network_error(error):
        return OfflineCacheMissError(
            f"Lost the connection to the Hub at {endpoint} while downloading {repo_id} "
            f"({type(error).__name__}: {scrub(error)}). Run again to resume; set HF_HUB_OFFLINE=1 to use "
            "only the local cache."
        )
    if isinstance(error, hub.HFValidationError):
        return SourceNotFoundError(f"{repo_id!r} is not a valid Hub repository id: {scrub(error)}")
    if isinstance(error, OSError) and "Consistency check failed" in str(error):
        return CorruptCheckpointError(
            f"A file of {repo_id} arrived incomplete ({scrub(error)}). Run again to download it anew."
        )
    return None


_HUB_ERRORS = (
    "DisabledRepoError", "GatedRepoError", "HfHubHTTPError", "HFValidationError",
    "IncompleteSnapshotError", "LocalEntryNotFoundError", "OfflineModeIsEnabled",
    "RemoteEntryNotFoundError", "RepositoryNotFoundError", "RevisionNotFoundError",
)


class _NeverRaised(Exception):
    """Stands in for an error class that the installed huggingface_hub does not define."""


def hub_error_classes() -> SimpleNamespace:
    # Some of these classes are newer than huggingface_hub 1.0 (the oldest version we support).
    from huggingface_hub import errors

    return SimpleNamespace(**{name: getattr(errors, name, _NeverRaised) for name in _HUB_ERRORS})


def _cached_snapshot(cache: str, repo_id: str, revision: str) -> Path | None:
    """The cache's snapshot folder for `revision` (a commit, or a branch/tag recorded in refs/)."""
    repo_dir = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    commit = revision
    if not re.fullmatch(r"[0-9a-f]{40}", revision):
        try:
            commit = (repo_dir / "refs" / revision).read_text().strip()
        except OSError:
            return None
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def is_offline(constants: ModuleType) -> bool:
    is_offline_mode = getattr(constants, "is_offline_mode", None)
    return bool(is_offline_mode() if callable(is_offline_mode) else constants.HF_HUB_OFFLINE)


def is_network_error(error: BaseException) -> bool:
    """A transport-level failure of huggingface_hub's HTTP client (httpx in 1.x, httpx2 in 2.x)."""
    for cls in type(error).__mro__:
        if cls.__module__.split(".")[0] in ("httpx", "httpx2") and cls.__name__ == "TransportError":
            return True
    return isinstance(error, (ConnectionError, TimeoutError))


def _token_in_use(token: str | None) -> bool:
    if token:
        return True
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:  # noqa: BLE001 - only used to word a message
        return bool(os.environ.get("HF_TOKEN"))


def redact(text: str, token: str | None) -> str:
    for secret in {token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")}:
        if secret:
            text = text.replace(secret, "***")
    return text
