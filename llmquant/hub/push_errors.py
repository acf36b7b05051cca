"""Turn huggingface_hub's failures during an upload into one line that says what to do.

The token is never part of a message: nothing here formats it, and text taken from a server
answer is scrubbed of it (a server may echo a header back).
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

from llmquant.errors import HubPushError, HubUnreachableError, LLMQuantError
from llmquant.loading.hub_errors import hub_error_classes, is_network_error, redact

TOKEN_ADVICE = ("Create a token with write access at https://huggingface.co/settings/tokens (or your Hub's "
                "settings page) and set it as HF_TOKEN, or run `hf auth login`.")


class PushStep:
    """What the upload was doing, for the message: "creating the repository", "committing", ..."""

    def __init__(self) -> None:
        self.doing = "contacting the Hub"


@contextlib.contextmanager
def push_errors(repo_id: str, endpoint: str, token: str | None, revision: str | None,
                step: PushStep) -> Iterator[None]:
    try:
        yield
    except LLMQuantError:
        raise
    except Exception as e:  # noqa: BLE001 - translated below, or re-raised unchanged
        translated = translate_push_error(e, repo_id, endpoint, token, revision, step.doing)
        if translated is None:
            raise
        raise translated from None


def translate_push_error(error: BaseException, repo_id: str, endpoint: str, token: str | None,
                         revision: str | None, doing: str) -> LLMQuantError | None:
    hub = hub_error_classes()
    where = f"the Hub at {endpoint}"
    at_hub = f"The Hub at {endpoint}"

    def server_says(err: BaseException) -> str:
        text = getattr(err, "server_message", None) or str(err)
        first = next((line.strip() for line in str(text).splitlines() if line.strip()), "")
        return redact(first, token)[:300]

    xet = _xet_refused(error)
    if xet is not None:
        return HubPushError(
            f"{at_hub} does not offer Xet storage, which huggingface_hub uses for large files when hf_xet is "
            f"installed (its Xet credentials endpoint answered {xet}). For a Hub mirror that stores large files "
            "with Git LFS, run again with HF_HUB_DISABLE_XET=1.")
    if is_network_error(error) or (isinstance(error, (RuntimeError, OSError)) and _network_cause(error)):
        cause = _network_cause(error) or error
        return HubUnreachableError(
            f"Cannot reach {where} while {doing} ({type(cause).__name__}: {server_says(cause)}). Check the "
            "network, proxy and HF_ENDPOINT, then run the same command again: files already uploaded are "
            "not sent twice.")
    if isinstance(error, hub.RevisionNotFoundError):
        return HubPushError(
            f"Branch {revision or 'main'!r} does not exist in {repo_id} on {where}. With --create-pr the pull "
            "request targets an existing branch: push to that branch first (without --create-pr, --revision "
            "creates it), or drop --revision.")
    if isinstance(error, hub.RepositoryNotFoundError):
        return HubPushError(
            f"{at_hub} has no repository {repo_id} that the token in use can write to (while {doing}). Check the "
            "namespace (your user name or an organization you belong to) and that the token has write access "
            f"to it. {TOKEN_ADVICE}")
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(error, hub.HfHubHTTPError) and status in (401, 403):
        reason = ("the token is missing, invalid or expired" if status == 401
                  else "the token has no write access to this repository or namespace")
        return HubPushError(f"{at_hub} refused the upload to {repo_id} while {doing} (HTTP {status}): {reason}. "
                            f"{TOKEN_ADVICE}")
    if isinstance(error, hub.HfHubHTTPError) and status is not None:
        retry = " Try again later." if status >= 500 else ""
        return HubPushError(f"{at_hub} answered HTTP {status} while {doing} for {repo_id}: "
                            f"{server_says(error)}.{retry}")
    if isinstance(error, ValueError) and "metadata in README.md" in str(error):
        details = "; ".join(line.strip("- ").strip() for line in str(error).splitlines()[1:] if line.strip())
        return HubPushError(f"{at_hub} rejected the model card's metadata (README.md): {redact(details, token)}. "
                            "Fix the YAML block at the top of README.md, or pass --overwrite-card to regenerate it.")
    return None


def _xet_refused(error: BaseException) -> str | None:
    """hf_xet reports an HTTP error from the Xet token endpoint as a ConnectionError whose text
    names the URL: "... HTTP status client error (404 Not Found), domain: .../xet-write-token/main"."""
    seen: BaseException | None = error
    for _ in range(5):
        if seen is None:
            return None
        text = str(seen)
        if "xet-write-token" in text:
            match = re.search(r"HTTP status (?:client|server) error \(([^)]*)\)", text)
            return f"HTTP {match.group(1)}" if match else "with an error"
        seen = seen.__cause__ or seen.__context__
    return None


def _network_cause(error: BaseException) -> BaseException | None:
    """huggingface_hub wraps some transport errors (an LFS upload: RuntimeError from ConnectError)."""
    seen = error
    for _ in range(5):
        seen = seen.__cause__ or seen.__context__
        if seen is None:
            return None
        if is_network_error(seen):
            return seen
    return None
