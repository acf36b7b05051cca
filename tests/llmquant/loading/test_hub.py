"""Hub ids through the real huggingface_hub client, against a local Hub server: downloads, revisions,
tokens, and every access failure turned into a clear error.

huggingface_hub reads HF_ENDPOINT and HF_HOME at import, so the cases resolve in a fresh interpreter;
cases that share an environment share one (see resolve_runner.py). Loading the downloaded folders,
where checked, runs here.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmquant.loading import ModelSource, load_model

TOKEN = "hf_TestTokenThatMustNeverBePrinted1234"
COMMIT = "5f6e7d8c9b0a1f2e3d4c5b6a7f8e9d0c1b2a3f4e"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model_dir, helpers) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("hub-folders")
    return SimpleNamespace(tiny=tiny_model_dir,
                           sharded=helpers.save_sharded(tiny_model_dir, root / "sharded", "100KB"),
                           pickle=helpers.pickle_only_copy(tiny_model_dir, root / "pickle"))


@pytest.fixture(scope="module")
def anonymous(hub_server, folders, helpers, tmp_path_factory):
    """Cases resolved with no token."""
    hub_server.add_folder("org/tiny", folders.tiny)
    hub_server.add_folder("org/by-commit", folders.tiny, commit=COMMIT)
    hub_server.add_folder("org/gated", folders.tiny, access="gated", token=TOKEN)
    hub_server.add_folder("org/private", folders.tiny, access="private", token=TOKEN)
    hub_server.add_folder("org/old-refused", folders.pickle)
    hub_server.add_folder("org/old-allowed", folders.pickle)
    hub_server.add_folder("org/down", folders.tiny, outage_status=503)
    cases = {
        "unknown revision": {"source": "org/tiny", "revision": "no-such-branch"},
        "commit revision": {"source": "org/by-commit", "revision": COMMIT},
        "gated": {"source": "org/gated"},
        "private": {"source": "org/private"},
        "missing": {"source": "org/missing"},
        "pickle refused": {"source": "org/old-refused"},
        "pickle allowed": {"source": "org/old-allowed", "allow_pickle": True},
        "outage": {"source": "org/down"},
    }
    return helpers.resolve_in_child(cases, tmp_path_factory.mktemp("hf_home"),
                                    {"HF_ENDPOINT": hub_server.url})


@pytest.fixture(scope="module")
def with_token(hub_server, folders, helpers, tmp_path_factory):
    """Cases resolved with HF_TOKEN set."""
    repo = hub_server.add_folder("org/tiny-gated", folders.sharded, commit=COMMIT, branches=("main", "v1"),
                                 access="gated", token=TOKEN)
    # Files a model folder never loads: they must not be downloaded.
    repo.files["consolidated.safetensors"] = b"not needed"
    repo.files["original/consolidated.00.pth"] = b"not needed"
    hub_server.add_folder("org/someone-elses", folders.tiny, access="private", token="hf_TheRightOne")
    cases = {
        "gated with token": {"source": "org/tiny-gated", "revision": "v1"},
        "wrong token": {"source": "org/someone-elses"},
    }
    return helpers.resolve_in_child(cases, tmp_path_factory.mktemp("hf_home"),
                                    {"HF_ENDPOINT": hub_server.url, "HF_TOKEN": TOKEN})


def _as_source(data: dict) -> ModelSource:
    return ModelSource(kind=data["kind"], name=data["name"], path=Path(data["path"]),
                       revision=data["revision"])


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits.float()


def test_gated_download_sends_the_token_and_records_the_commit(with_token, hub_server, folders):
    source = _as_source(with_token.outcomes["gated with token"].resolved())

    assert (source.kind, source.revision) == ("hub", COMMIT)  # branch v1 resolved to its commit
    assert source.describe() == f"org/tiny-gated@{COMMIT[:7]}"
    assert source.path.name == COMMIT and source.path.parent.name == "snapshots"
    requests = hub_server.requests_for("org/tiny-gated")
    assert requests and all(r.authorization == f"Bearer {TOKEN}" for r in requests)
    assert TOKEN not in with_token.output


def test_download_fetches_exactly_the_files_a_model_folder_loads(with_token, hub_server, folders):
    source = _as_source(with_token.outcomes["gated with token"].resolved())

    shards = sorted(p.name for p in folders.sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert hub_server.downloaded_files("org/tiny-gated") == sorted(p.name for p in folders.sharded.iterdir())
    for name in shards + ["config.json", "model.safetensors.index.json", "tokenizer.json"]:
        assert (source.path / name).read_bytes() == (folders.sharded / name).read_bytes()


def test_downloaded_sharded_model_loads_with_the_original_logits(with_token, folders):
    from transformers import AutoModelForCausalLM

    loaded = load_model(_as_source(with_token.outcomes["gated with token"].resolved()),
                        dtype="float32", device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(folders.tiny, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(loaded.model, loaded.tokenizer), _logits(reference, loaded.tokenizer))
    assert loaded.source.revision == COMMIT


def test_wrong_token_is_refused_without_printing_it(with_token, hub_server):
    message = with_token.outcomes["wrong token"].failed_with("AccessDeniedError")
    assert "HTTP 401" in message and "invalid" in message and "HF_TOKEN" in message
    assert hub_server.requests_for("org/someone-elses")[0].authorization == f"Bearer {TOKEN}"
    assert TOKEN not in with_token.output


def test_commit_hash_revision_is_used_as_is(anonymous, hub_server):
    assert anonymous.outcomes["commit revision"].resolved()["revision"] == COMMIT
    # A commit is immutable: the client does not ask which commit a branch points to.
    assert not any("/revision/" in r.path for r in hub_server.requests_for("org/by-commit"))


def test_unknown_revision_is_named(anonymous):
    message = anonymous.outcomes["unknown revision"].failed_with("SourceNotFoundError")
    assert "Revision 'no-such-branch' not found in the Hub repository org/tiny" in message


def test_gated_repo_without_token_says_accept_the_license_and_set_hf_token(anonymous, hub_server):
    message = anonymous.outcomes["gated"].failed_with("AccessDeniedError")
    assert "gated" in message and "accept" in message and "HF_TOKEN" in message
    assert f"{hub_server.url}/org/gated" in message  # where to accept the license


@pytest.mark.parametrize("case", ["missing", "private"])
def test_missing_or_private_repo_is_not_found_on_the_hub(anonymous, case):
    # The Hub answers both the same way, so that private repositories stay secret.
    message = anonymous.outcomes[case].failed_with("SourceNotFoundError")
    assert f"The Hub has no repository org/{case}" in message
    assert "private" in message and "HF_TOKEN" in message


def test_pickle_only_repo_is_refused_before_downloading_its_weights(anonymous, hub_server):
    message = anonymous.outcomes["pickle refused"].failed_with("PickleRefusedError")
    assert "--allow-pickle" in message and "pytorch_model.bin" in message
    assert "pytorch_model.bin" not in hub_server.downloaded_files("org/old-refused")


def test_pickle_only_repo_downloads_and_loads_when_allowed(anonymous, hub_server):
    source = _as_source(anonymous.outcomes["pickle allowed"].resolved())
    assert "pytorch_model.bin" in hub_server.downloaded_files("org/old-allowed")
    loaded = load_model(source, allow_pickle=True, dtype="float32", device="cpu")
    assert torch.isfinite(_logits(loaded.model, loaded.tokenizer)).all()


def test_interrupted_download_is_reported_as_incomplete_when_offline(anonymous, helpers):
    # Lose the weights of a completed download, as an interrupted download would, then go offline.
    snapshot = Path(anonymous.outcomes["commit revision"].resolved()["path"])
    (snapshot / "model.safetensors").unlink()
    offline = helpers.resolve_in_child({"again": {"source": "org/by-commit", "revision": COMMIT}},
                                       anonymous.hf_home, {"HF_HUB_OFFLINE": "1"})
    message = offline.outcomes["again"].failed_with("OfflineCacheMissError")
    assert f"its cached copy ({snapshot}) is incomplete" in message
    assert "HF_HUB_OFFLINE=1 forbids downloading" in message and "hf download org/by-commit" in message


def test_hub_outage_reports_the_http_status(anonymous):
    message = anonymous.outcomes["outage"].failed_with("OfflineCacheMissError")
    assert "HTTP 503" in message and "Try again later" in message
