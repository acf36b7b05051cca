"""`llmquant push` as a user runs it: HF_ENDPOINT and HF_TOKEN from the environment, one line per
failure with its exit code and no traceback, the token never in the output."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from llmquant.cli import main

_HF_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HOME", "HF_TOKEN_PATH",
                 "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "HF_OIDC_RESOURCE")


@pytest.fixture
def hub_env(monkeypatch, tmp_path, upload_hub, hub_consts):
    """In-process CLI runs against the test server, as HF_ENDPOINT / HF_TOKEN would set it up."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", upload_hub.url)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-login"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", hub_consts.token)
    return monkeypatch


def _one_line_error(capsys, code: int, expected_code: int, token: str) -> str:
    out, err = capsys.readouterr()
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert token not in out + err
    return lines[0]


def test_cli_honours_hf_endpoint_and_hf_token(upload_hub, folder, hub_consts, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in _HF_VARIABLES}
    env.update(HF_ENDPOINT=upload_hub.url, HF_TOKEN=hub_consts.token, HF_HOME=str(tmp_path / "hf"),
               HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run([sys.executable, "-m", "llmquant", "push", str(folder), "me/from-cli",
                           "--commit-message", "from the command line"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    head = upload_hub.repos["me/from-cli"].head("main")
    assert head.summary == "from the command line"
    assert head.files["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert f"commit: {upload_hub.url}/me/from-cli/commit/{head.oid}" in proc.stdout
    assert re.search(rf"pushed {len(head.files)} files, [\d.]+ kB, to me/from-cli at {upload_hub.url}", proc.stdout)
    assert hub_consts.token not in proc.stdout + proc.stderr


def test_cli_dry_run_prints_files_sizes_and_card(folder, capsys, monkeypatch, hub_consts):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub_consts.unreachable)
    assert main(["push", str(folder), "me/dry", "--dry-run", "--license", "mit"]) == 0
    out = capsys.readouterr().out
    for path in folder.iterdir():
        assert re.search(rf"^\s+\S+ k?B  {re.escape(path.name)}$", out, re.M), path.name
    assert re.search(r"^\s+[\d.]+ kB  model.safetensors$", out, re.M)
    assert "--- README.md (generated model card) ---\n---\nlicense: mit\n" in out
    assert not (folder / "README.md").exists()


def test_cli_wrong_token(hub_env, folder, capsys):
    hub_env.setenv("HF_TOKEN", "hf_NotAValidToken0000")
    line = _one_line_error(capsys, main(["push", str(folder), "me/denied"]), 2, "hf_NotAValidToken0000")
    assert "HTTP 401" in line and "the token is missing, invalid or expired" in line


def test_cli_no_token_fails_before_any_request(hub_env, folder, capsys, upload_hub, hub_consts):
    hub_env.delenv("HF_TOKEN")
    before = len(upload_hub.requests)
    line = _one_line_error(capsys, main(["push", str(folder), "me/anon"]), 2, hub_consts.token)
    assert "No Hugging Face token" in line and len(upload_hub.requests) == before


def test_cli_repository_not_found(hub_env, folder, capsys, upload_hub, hub_consts):
    upload_hub.add_repo("team/locked", "hf_SomeoneElsesToken")
    line = _one_line_error(capsys, main(["push", str(folder), "team/locked"]), 2, hub_consts.token)
    assert "has no repository team/locked that the token in use can write to" in line


def test_cli_network_down(hub_env, folder, capsys, hub_consts):
    from huggingface_hub import constants

    hub_env.setattr(constants, "ENDPOINT", hub_consts.unreachable)
    line = _one_line_error(capsys, main(["push", str(folder), "me/offline"]), 1, hub_consts.token)
    assert line.startswith(f"error: Cannot reach the Hub at {hub_consts.unreachable}")


def test_cli_mirror_without_xet_says_what_to_set(hub_env, folder, capsys, hub_consts):
    from huggingface_hub import constants

    hub_env.setattr(constants, "HF_HUB_DISABLE_XET", False)
    line = _one_line_error(capsys, main(["push", str(folder), "me/xet"]), 2, hub_consts.token)
    assert "does not offer Xet storage" in line and "HF_HUB_DISABLE_XET=1" in line


def test_cli_bad_repo_id(folder, capsys, hub_consts):
    line = _one_line_error(capsys, main(["push", str(folder), "no-namespace"]), 2, hub_consts.token)
    assert "NAMESPACE/NAME" in line


def test_cli_offline_mode_refuses_to_upload(hub_env, folder, capsys, upload_hub, hub_consts):
    from huggingface_hub import constants

    hub_env.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(upload_hub.requests)
    line = _one_line_error(capsys, main(["push", str(folder), "me/offline-mode"]), 1, hub_consts.token)
    assert "HF_HUB_OFFLINE=1 forbids any upload" in line and len(upload_hub.requests) == before
    assert main(["push", str(folder), "me/offline-mode", "--dry-run"]) == 0  # a dry run needs no network
