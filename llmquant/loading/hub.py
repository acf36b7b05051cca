"""Download a model from the Hugging Face Hub into the standard Hugging Face cache.

The download goes through `huggingface_hub.snapshot_download` with no overrides, so the client's
own settings apply unchanged: HF_TOKEN (or the saved login), HF_HOME / HF_HUB_CACHE,
HF_ENDPOINT, and HF_HUB_OFFLINE (then only the cache is used).

It runs in two steps so that only the weights that will be loaded are fetched:

1. configs, tokenizer files, chat templates and the weight index (small files). Online, this
   also records the repository's file listing in the cache;
2. from that listing, the weights: `model.safetensors` or the shards the safetensors index
   names. Pickle weights (`pytorch_model*.bin`) only when the repository has no safetensors and
   `allow_pickle` is set, and are refused before downloading them otherwise. Files a model
   folder does not load (`consolidated.safetensors`, `original/*.pth`, `onnx/`, GGUF copies)
   are never downloaded.

Offline, both steps resolve from the cache, and the checks on the folder happen at load time.
"""

from __future__ import annotations

from pathlib import Path

from llmquant.loading.hub_errors import hub_errors
from llmquant.loading.validation import (
    PICKLE_FILE,
    PICKLE_INDEX,
    SAFETENSORS_FILE,
    SAFETENSORS_INDEX,
    choose_weight_format,
    shard_names,
)

# Everything a model folder needs besides its weights. Top-level names only where the pattern
# allows it: fnmatch's "*" also matches "/", so "*.json" would pull every JSON in subfolders.
METADATA_PATTERNS = [
    "config.json", "generation_config.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "spiece.model", "*.tiktoken", "chat_template.json", "*.jinja",
    SAFETENSORS_INDEX, PICKLE_INDEX,
    # Model code for auto_map configs; downloading it runs nothing (--trust-remote-code decides).
    "*.py",
]
# Used when the repository's file listing is unknown (an older huggingface_hub, or offline).
SAFETENSORS_PATTERNS = [SAFETENSORS_FILE, "model-*-of-*.safetensors"]
PICKLE_PATTERNS = [PICKLE_FILE, "pytorch_model-*-of-*.bin"]


def download_snapshot(repo_id: str, *, revision: str | None = None, token: str | None = None,
                      allow_pickle: bool = False) -> tuple[Path, str]:
    """Return (snapshot folder, commit hash) for `repo_id` at `revision` (default branch if None)."""
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id, revision, token):
        meta_folder = Path(snapshot_download(
            repo_id, revision=revision, token=token, allow_patterns=METADATA_PATTERNS,
        ))
        # The cache keeps each commit in snapshots/<commit hash>/: the folder name is the commit.
        commit = meta_folder.name
        patterns = _weight_patterns(repo_id, meta_folder, commit, allow_pickle)
        if patterns is None:
            return meta_folder, commit
        folder = Path(snapshot_download(
            repo_id, revision=commit, token=token, allow_patterns=patterns,
        ))
    return folder, commit


def _weight_patterns(repo_id: str, meta_folder: Path, commit: str, allow_pickle: bool) -> list[str] | None:
    """What to download in step 2; None when step 1 was served from the cache alone."""
    names = _listed_top_level_files(repo_id, commit)
    if names is None:
        if _client_keeps_listings():
            # Step 1 reached no Hub (HF_HUB_OFFLINE, or the Hub is down and the cache answered):
            # step 2 could not download either, and the client would retry its listing request
            # for about 20 s before falling back to the same cached folder.
            return None
        return SAFETENSORS_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    where = f"The Hub repository {repo_id} (commit {commit[:7]})"
    if choose_weight_format(names, allow_pickle, where) == "safetensors":
        index, single = SAFETENSORS_INDEX, SAFETENSORS_FILE
    else:
        index, single = PICKLE_INDEX, PICKLE_FILE
    if (meta_folder / index).is_file():
        return [index, *shard_names(meta_folder / index)]
    return [single]


def _client_keeps_listings() -> bool:
    """huggingface_hub 2.x caches each commit's file listing when it downloads online."""
    import huggingface_hub

    return hasattr(huggingface_hub, "get_cached_repo_tree")


def _listed_top_level_files(repo_id: str, commit: str) -> list[str] | None:
    """Top-level file names of the repository at `commit`, from the cached listing; None if absent."""
    if not _client_keeps_listings():
        return None
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        files = get_cached_repo_tree(repo_id, revision=commit)
    except CachedRepoTreeNotFoundError:
        return None
    return [f.path for f in files if "/" not in f.path]
