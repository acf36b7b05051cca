"""The eval subcommands added next to perplexity: thin flags, clear errors."""

from __future__ import annotations

import json

from llmquant.cli import main


def test_agreement_command_prints_and_writes_the_result(tiny_model_dir, tmp_path, capsys, one_thread):
    out = tmp_path / "agreement.json"
    code = main(["eval", "agreement", str(tiny_model_dir), "--base", str(tiny_model_dir), "--dtype", "float32",
                 "--max-tokens", "300", "--window", "128", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("KL 0.00000 nats/token") and "top-1 agreement 100.00%" in printed
    result = json.loads(out.read_text())
    assert result["kl_mean"] == 0.0 and result["num_tokens_scored"] == 300 - 3


def test_suite_command_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["eval", "suite", str(missing), "--output", str(tmp_path / "out")]) == 2
    assert "Cannot read the suite file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [{name: a}]\ntasks: [{task: perplexity, stride: 4, windw: 8}]\n")
    assert main(["eval", "suite", str(bad), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Unknown key(s) 'windw' in task perplexity" in err and "window" in err


def test_load_command_refuses_a_bad_url(capsys):
    assert main(["eval", "load", "--base-url", "localhost:8000"]) == 2
    assert "must start with http://" in capsys.readouterr().err
