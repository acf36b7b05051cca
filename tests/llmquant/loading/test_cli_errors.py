"""A loading error through the real `llmquant` command: one paragraph on stderr, exit code 2, no
traceback, no token, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

TOKEN = "hf_CliTokenThatMustNeverBePrinted5678"


def _quantize_options() -> set[str] | None:
    """The option strings of `llmquant quantize`, or None while it is not registered."""
    try:
        from llmquant.cli import build_parser

        parser = build_parser()
    except ImportError:
        return None
    commands = next(a for a in parser._subparsers._group_actions if a.dest == "command").choices
    if "quantize" not in commands:
        return None
    return {s for action in commands["quantize"]._actions for s in action.option_strings}


def test_access_error_is_one_paragraph_without_traceback_or_token(hub_server, helpers, tmp_path,
                                                                   tiny_model_dir):
    options = _quantize_options()
    if options is None:
        pytest.skip("`llmquant quantize` is not registered in the CLI yet")
    hub_server.add_folder("org/private", tiny_model_dir, access="private", token="hf_TheRightOne")
    output = tmp_path / "out"
    args = ["org/private", *(["--output", str(output)] if "--output" in options else [])]

    result = subprocess.run([sys.executable, "-m", "llmquant", "quantize", *args], capture_output=True,
                            text=True, timeout=120,
                            env=helpers.child_env(tmp_path / "hf_home",
                                                  {"HF_ENDPOINT": hub_server.url, "HF_TOKEN": TOKEN}))

    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: The Hub refused access to org/private (HTTP 401)")
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert "HF_TOKEN" in result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert not output.exists()
