"""Documents from a Hugging Face Hub dataset, with errors a user can act on.

Hub datasets are read with `datasets.load_dataset(name, config, split=...)` (so they
come from the local datasets cache when it has them, offline included). Failures are
turned into `DataSourceError`s that say which of the usual causes applies: no network or
offline mode, a name the Hub does not know, or a wrong config or split name.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlparse

from llmquant.data.files import documents_from_table
from llmquant.data.sources import DatasetSpec, supported_extensions_text
from llmquant.errors import DataSourceError

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_NETWORK_ERROR_NAMES = {
    "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout",
    "ReadTimeout", "ReadTimeoutError", "MaxRetryError", "NewConnectionError", "TimeoutException",
}


def read_hub_documents(spec: DatasetSpec, split: str) -> list[str]:
    """All documents of one split of a Hub dataset, in dataset order."""
    import datasets

    with hub_access(spec, split):
        table = datasets.load_dataset(spec.name, spec.config_name, split=split)
    return documents_from_table(table, spec.text_field, f"{spec.describe()}, split {split!r}")


def hub_split_names(spec: DatasetSpec) -> list[str]:
    """The split names the dataset (config) defines, e.g. ["train", "validation", "test"]."""
    import datasets

    with hub_access(spec, None):
        return list(datasets.get_dataset_split_names(spec.name, spec.config_name))


def offline_variables_set() -> list[str]:
    return [v for v in _OFFLINE_VARIABLES
            if os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}]


def _is_network_error(error: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = error
    # datasets re-raises network failures as ConnectionError, sometimes a few causes deep.
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if type(current).__name__ in _NETWORK_ERROR_NAMES:
            return True
        current = current.__cause__ or current.__context__
    return False


@functools.lru_cache(maxsize=1)
def hub_host_resolves() -> bool:
    """Whether the Hub's host name resolves: a fast proxy for "is there a network"."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def hub_access(spec: DatasetSpec, split: str | None) -> Iterator[None]:
    """Fetch from the Hub inside this block; errors come out as `DataSourceError`s.

    Without a network, huggingface_hub retries each request for about 25 seconds before
    giving up. When the Hub's host does not even resolve, we switch `datasets` to
    offline mode for the call instead: a cached dataset still loads, and a missing one
    fails at once.
    """
    unreachable = not offline_variables_set() and not hub_host_resolves()
    with _offline_mode(unreachable), _as_data_source_errors(spec, split, unreachable):
        yield


@contextlib.contextmanager
def _offline_mode(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    # Both libraries read these flags at import time and consult the module attributes
    # on every request, so setting the attributes is the only way to switch at run time.
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _as_data_source_errors(spec: DatasetSpec, split: str | None,
                           unreachable: bool) -> Iterator[None]:
    from datasets.exceptions import DatasetNotFoundError

    what = spec.describe() + (f", split {split!r}" if split else "")
    alternatives = (
        f"Use a local file ({supported_extensions_text()}) or the built-in corpus "
        "(--dataset builtin) instead."
    )
    try:
        yield
    except DataSourceError:
        raise
    except Exception as e:
        offline = offline_variables_set()
        # Offline, a dataset missing from the cache surfaces as "file not found".
        if _is_network_error(e) or ((offline or unreachable) and isinstance(e, FileNotFoundError)):
            reason = (f"offline mode is on ({', '.join(v + '=1' for v in offline)})" if offline
                      else "the Hugging Face Hub cannot be reached (no network?)")
            raise DataSourceError(
                f"Cannot load {what}: {reason}, and the dataset is not in the local datasets "
                f"cache. {alternatives} (If {spec.name!r} was meant as a local file: no such "
                "file exists.)"
            ) from e
        if isinstance(e, DatasetNotFoundError):
            raise DataSourceError(
                f"Cannot load {what}: the Hub has no dataset named {spec.name!r} (or it is private "
                f"or gated: log in with `hf auth login`). If it was meant as a local file: no "
                f"such file exists. {alternatives}"
            ) from e
        raise DataSourceError(f"Cannot load {what}: {type(e).__name__}: {e}") from e
