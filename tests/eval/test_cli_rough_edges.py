"""`llmquant eval` as a user meets it: which part of a file is scored, files that are empty or
have no extension, a URL with no server behind it, and --revision reaching the loader."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llmquant.cli import main

DOCUMENTS = [f"Entry {i}: " + f"the meeting moved to room {i} on day {i % 5}. " * (12 + i) for i in range(10)]
REPO = Path(__file__).resolve().parents[2]


def _notes(path: Path) -> Path:
    path.write_text("\n\n".join(DOCUMENTS) + "\n", encoding="utf-8")
    return path


def _perplexity_json(capsys, *args: str) -> dict:
    assert main(["eval", "perplexity", *args, "--dtype", "float32", "--window", "128", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_named_file_is_scored_whole_unless_held_out_is_asked(tiny_model_dir, tiny_tokenizer, tmp_path, capsys,
                                                                one_thread):
    from llmquant.data import evaluation_stream

    notes = _notes(tmp_path / "notes")  # no extension: read as plain text
    whole = _perplexity_json(capsys, str(tiny_model_dir), "--dataset", str(notes))
    expected_tokens = len(tiny_tokenizer("\n\n".join(DOCUMENTS), add_special_tokens=False).input_ids)
    assert whole["method"]["num_tokens"] == expected_tokens
    assert whole["method"]["split"] == "all documents"
    assert whole["method"]["scored"] == f"all documents of file {notes} ({expected_tokens:,} tokens)"

    held_out = _perplexity_json(capsys, str(tiny_model_dir), "--dataset", str(notes), "--split", "held-out")
    assert held_out["method"]["num_tokens"] == evaluation_stream(tiny_tokenizer, notes).num_tokens
    assert held_out["method"]["num_tokens"] < expected_tokens / 2
    assert held_out["method"]["scored"].startswith("evaluation split (last ")

    # The summary names the part scored too; the built-in corpus keeps its held-out split.
    assert main(["eval", "perplexity", str(tiny_model_dir), "--max-tokens", "300", "--window", "128"]) == 0
    text_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("text "))
    assert "evaluation split (last" in text_line and "builtin corpus" in text_line
    assert "its first 300 tokens, cut by max_tokens" in text_line


@pytest.mark.parametrize("name,content,message", [
    ("notes", b"", "is empty: there is no text in it"),
    ("notes.txt", b"", "is empty: there is no text in it"),
    ("notes", b"\x00\x01\x02binary\xff\xfe", "no extension and is not UTF-8 text"),
])
def test_unusable_files_are_one_paragraph_errors(tiny_model_dir, tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["eval", "perplexity", str(tiny_model_dir), "--dataset", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in " ".join(err.split())
    assert "Traceback" not in err and "UTF-8 encoded" not in err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# With a served model name given, the server is still asked first (before any tokenizer loads).
@pytest.mark.parametrize("args", [["load"], ["load", "--model", "tiny"], ["remote"]])
def test_a_url_with_no_server_says_so(args, capsys):
    port = _closed_port()
    url = f"http://127.0.0.1:{port}/v1"
    assert main(["eval", args[0], "--base-url", url, *args[1:]]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"Could not reach {url}" in err and "Is a server running there?" in err
    assert f"llmquant serve MODEL --port {port}" in err
    assert "Traceback" not in err


def test_revision_reaches_the_loader_of_every_local_model(tiny_model_dir, capsys):
    # A local folder has no revisions: the loader refuses one instead of it being dropped.
    cases = [["agreement", str(tiny_model_dir), "--base", str(tiny_model_dir), "--revision", "v9"],
             ["agreement", str(tiny_model_dir), "--base", str(tiny_model_dir), "--base-revision", "v9"],
             ["throughput", str(tiny_model_dir), "--revision", "v9", "--prefill-lengths", "8", "--batch-sizes", "1"]]
    for args in cases:
        assert main(["eval", *args]) == 2, args
        err = " ".join(capsys.readouterr().err.split())
        assert "--revision v9 only applies to Hub ids" in err and "Traceback" not in err


def _cache(hf_home: Path, repo_id: str, folder: Path, refs: dict[str, str]) -> None:
    """`folder` laid out in huggingface_hub's cache layout, once per commit in `refs`."""
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    for ref, commit in refs.items():
        (repo_dir / "refs" / ref).write_text(commit)
        snapshot = repo_dir / "snapshots" / commit
        snapshot.mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.iterdir()):
            data = path.read_bytes()
            blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            if not (snapshot / path.name).exists():
                os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)


def test_revision_selects_the_commit_from_an_offline_hub_cache(tiny_model_dir, tmp_path):
    main_commit, tagged_commit = "a" * 40, "b" * 40
    _cache(tmp_path / "hf", "org/tiny", tiny_model_dir, {"main": main_commit, "v1": tagged_commit})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmquant", "eval", *args], capture_output=True, text=True,
                              env=env, timeout=300)

    out = tmp_path / "agreement.json"
    proc = run("agreement", "org/tiny", "--revision", "v1", "--base", "org/tiny", "--dtype", "float32",
               "--max-tokens", "200", "--window", "128", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["model"] == f"org/tiny@{tagged_commit[:7]}" and result["base"] == f"org/tiny@{main_commit[:7]}"

    proc = run("throughput", "org/tiny", "--revision", "v2", "--prefill-lengths", "8", "--batch-sizes", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "org/tiny (revision v2)" in proc.stderr and "not in the local Hugging Face cache" in proc.stderr


def test_the_eval_command_modules_import_no_cycle():
    # eval_cmd registers the other metric modules; none of them may import it back.
    for name in ("eval_measure_cmd", "eval_suite_cmd", "eval_flags"):
        tree = ast.parse((REPO / "llmquant" / "cli" / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                     for a in n.names}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "llmquant.cli.eval_cmd" not in imported, name
