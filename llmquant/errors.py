"""Errors meant for the user.

Every failure a user can cause or fix (a wrong path, a missing package, a bad recipe)
raises a subclass of `LLMQuantError`. The CLI prints its message as one paragraph,
without a traceback, and exits with `exit_code`. Anything else is a bug in llmquant and
keeps its traceback.
"""

from __future__ import annotations


class LLMQuantError(Exception):
    """Base class: the message says what went wrong and what to do about it."""

    exit_code = 2


class SourceNotFoundError(LLMQuantError):
    """A local path that does not exist, or a Hub id the Hub does not know."""


class OfflineCacheMissError(LLMQuantError):
    """A Hub id requested while offline (HF_HUB_OFFLINE=1) that is not in the local cache."""


class AccessDeniedError(LLMQuantError):
    """An unauthorized, private or gated Hub repository."""


class UnsupportedArchitectureError(LLMQuantError):
    """A checkpoint whose architecture transformers cannot build as a causal LM."""


class CorruptCheckpointError(LLMQuantError):
    """A truncated or malformed weights file, or a config that does not match the tensors."""


class PickleRefusedError(LLMQuantError):
    """A checkpoint that only has pickle weights (.bin/.pt/.pth) and --allow-pickle was not given."""


class InvalidConfigError(LLMQuantError):
    """A recipe, scheme or option with an unknown key or an invalid value."""


class OutputExistsError(LLMQuantError):
    """The output folder exists and --overwrite was not given."""


class OutputNotWritableError(LLMQuantError):
    """The output folder cannot be created where it was asked for (no permission, a file in the way)."""


class DataSourceError(LLMQuantError):
    """A text dataset that cannot be read (missing file, unknown format, Hub offline)."""


class MissingDependencyError(LLMQuantError):
    """An optional package the requested feature needs is not installed."""


class HubPushError(LLMQuantError):
    """The Hub refused an upload: a missing or invalid token, no write access, an unknown branch."""


class HubUnreachableError(HubPushError):
    """The Hub (HF_ENDPOINT) could not be reached; running again later may succeed."""

    exit_code = 1
