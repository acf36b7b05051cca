"""`llmquant.push` with the real huggingface_hub client against a local Hub server: what arrives,
on which branch, with which message; pull requests; and every failure as one clear line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import llmquant
from llmquant.errors import CorruptCheckpointError, HubPushError, HubUnreachableError


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_every_file_byte_identical_in_one_commit(upload_hub, folder, hub_consts, no_xet):
    result = llmquant.push(folder, "me/tiny-w8a8", private=True, commit_message="W8A8 of tiny",
                           endpoint=upload_hub.url, token=hub_consts.token)

    repo = upload_hub.repos["me/tiny-w8a8"]
    assert repo.private and repo.owner_token == hub_consts.token
    assert len(repo.branches["main"]) == 2  # the initial commit + exactly one upload commit
    head = repo.head("main")
    assert head.summary == "W8A8 of tiny"
    assert result.commit_oid == head.oid and result.commit_url.endswith(head.oid) and result.pr_url is None
    # The card was written into the folder, and the folder arrived as it is on disk, byte for byte.
    assert result.card_action == "generated" and (folder / "README.md").read_text() == result.card
    assert head.files == _tree(folder)
    assert {"model.safetensors", "config.json", "recipe.yaml", "quantization_report.json",
            "perplexity_quantized.json", "README.md"} <= set(head.files)
    # The weights went through Git LFS (batch + PUT of the exact bytes), the rest inline.
    weights = (folder / "model.safetensors").read_bytes()
    assert upload_hub.lfs[hashlib.sha256(weights).hexdigest()] == weights
    assert any(r.path.endswith(hashlib.sha256(weights).hexdigest()) for r in upload_hub.seen("/lfs/"))
    # Every API request carried the token, only as the Authorization header; the storage URL none.
    puts = [r for r in upload_hub.requests if r.method == "PUT"]
    assert puts and all(r.authorization is None for r in puts)
    assert all(r.authorization == f"Bearer {hub_consts.token}" for r in upload_hub.requests if r.method != "PUT")
    assert not any(hub_consts.token in r.path for r in upload_hub.requests)
    assert not any(hub_consts.token.encode() in data for data in head.files.values())


def test_push_again_commits_only_what_changed(upload_hub, folder, hub_consts, no_xet):
    llmquant.push(folder, "me/again", endpoint=upload_hub.url, token=hub_consts.token)
    puts_before = len(upload_hub.seen("/lfs/me/again/"))
    (folder / "perplexity_quantized.json").write_text('{"perplexity": 1.5}')
    llmquant.push(folder, "me/again", commit_message="new numbers", endpoint=upload_hub.url, token=hub_consts.token)

    repo = upload_hub.repos["me/again"]
    assert [c.summary for c in repo.branches["main"][1:]] == [f"Upload W8A8 checkpoint with llmquant "
                                                             f"{llmquant.__version__}", "new numbers"]
    assert repo.head("main").files == _tree(folder)
    assert len(upload_hub.seen("/lfs/me/again/")) == puts_before  # unchanged weights were not sent again


def test_push_to_a_branch_leaves_main_alone(upload_hub, folder, hub_consts, no_xet):
    upload_hub.add_repo("me/branchy", hub_consts.token, {"README.md": b"# original\n"})
    result = llmquant.push(folder, "me/branchy", revision="w8a8", endpoint=upload_hub.url, token=hub_consts.token)

    repo = upload_hub.repos["me/branchy"]
    assert repo.head("main").files == {"README.md": b"# original\n"}
    assert repo.head("w8a8").files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert result.commit_oid == repo.head("w8a8").oid


def test_create_pr_opens_a_pull_request_instead_of_committing(upload_hub, folder, hub_consts, no_xet):
    upload_hub.add_repo("org/shared", hub_consts.token, {"README.md": b"# shared\n"})
    result = llmquant.push(folder, "org/shared", create_pr=True, commit_message="Add W8A8 weights",
                           endpoint=upload_hub.url, token=hub_consts.token)

    repo = upload_hub.repos["org/shared"]
    assert len(repo.branches["main"]) == 1  # nothing committed to main
    (pr,) = repo.pulls
    assert pr.target == "main" and pr.commit.summary == "Add W8A8 weights"
    assert result.pr_url == f"{upload_hub.url}/org/shared/discussions/{pr.num}"
    assert pr.commit.files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert pr.commit.files["README.md"] == b"# shared\n" or pr.commit.files["README.md"] == result.card.encode()
    assert all(r.query.get("create_pr") == ["1"] for r in upload_hub.seen("/org/shared/commit/"))


def test_create_pr_with_revision_targets_that_branch(upload_hub, folder, hub_consts, no_xet):
    upload_hub.add_repo("org/dev", hub_consts.token)
    llmquant.push(folder, "org/dev", revision="dev", endpoint=upload_hub.url, token=hub_consts.token)
    (folder / "perplexity_quantized.json").write_text('{"perplexity": 2.0}')
    result = llmquant.push(folder, "org/dev", revision="dev", create_pr=True, endpoint=upload_hub.url,
                           token=hub_consts.token)
    repo = upload_hub.repos["org/dev"]
    (pr,) = repo.pulls
    assert pr.target == "dev" and len(repo.branches["dev"]) == 2 and result.pr_url.endswith(f"/{pr.num}")
    assert pr.commit.files == _tree(folder)


def test_create_pr_against_a_missing_branch_is_one_clear_error(upload_hub, folder, hub_consts, no_xet):
    upload_hub.add_repo("org/nobranch", hub_consts.token)
    with pytest.raises(HubPushError, match=r"Branch 'dev' does not exist in org/nobranch") as e:
        llmquant.push(folder, "org/nobranch", revision="dev", create_pr=True, endpoint=upload_hub.url,
                      token=hub_consts.token)
    assert "\n" not in str(e.value)


def test_existing_card_is_kept_unless_overwrite_card(upload_hub, folder, hub_consts, no_xet):
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# My own words\n")
    kept = llmquant.push(folder, "me/card", endpoint=upload_hub.url, token=hub_consts.token)
    assert kept.card_action == "kept"
    assert upload_hub.repos["me/card"].head("main").files["README.md"] == b"---\nlicense: mit\n---\n# My own words\n"

    new = llmquant.push(folder, "me/card", overwrite_card=True, endpoint=upload_hub.url, token=hub_consts.token)
    assert new.card_action == "regenerated" and "# My own words" not in new.card
    assert upload_hub.repos["me/card"].head("main").files["README.md"] == new.card.encode()


def test_wrong_token_is_refused_with_one_line(upload_hub, folder, no_xet):
    with pytest.raises(HubPushError) as e:
        llmquant.push(folder, "me/x", endpoint=upload_hub.url, token="hf_WrongTokenValue")
    message = str(e.value)
    assert "HTTP 401" in message and "HF_TOKEN" in message and "\n" not in message
    assert "hf_WrongTokenValue" not in message


def test_someone_elses_repository_is_not_found(upload_hub, folder, hub_consts, no_xet):
    upload_hub.add_repo("other/private", "hf_SomeoneElsesToken")
    with pytest.raises(HubPushError, match="has no repository other/private that the token in use can write to"):
        llmquant.push(folder, "other/private", endpoint=upload_hub.url, token=hub_consts.token)
    assert upload_hub.repos["other/private"].head("main").files == {}


def test_unreachable_hub_is_one_line_and_exit_code_1(folder, hub_consts, no_xet):
    with pytest.raises(HubUnreachableError, match=r"Cannot reach the Hub at http://127.0.0.1:9 while creating "
                                                  r"the repository \(Connect") as e:
        llmquant.push(folder, "me/x", endpoint=hub_consts.unreachable, token=hub_consts.token)
    assert e.value.exit_code == 1 and "\n" not in str(e.value)


def test_folder_that_does_not_load_is_refused_before_any_request(upload_hub, folder, hub_consts):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a cut-off upload or copy
    before = len(upload_hub.requests)
    with pytest.raises(CorruptCheckpointError, match=r"^Not pushing: The weights file .*model.safetensors is "
                                                     r"corrupt: .*truncated"):
        llmquant.push(folder, "me/broken", endpoint=upload_hub.url, token=hub_consts.token)
    assert len(upload_hub.requests) == before and not (folder / "README.md").exists()


def test_dry_run_lists_files_and_card_without_network_or_token(folder, hub_consts, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = llmquant.push(folder, "me/dry", dry_run=True, endpoint=hub_consts.unreachable)
    sizes = {f.path_in_repo: f.size for f in result.files}
    on_disk = {name: len(data) for name, data in _tree(folder).items()}
    assert sizes == {**on_disk, "README.md": len(result.card.encode())}
    assert result.card.startswith("---\n") and not (folder / "README.md").exists()
    assert result.commit_url is None
