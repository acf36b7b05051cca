"""`llmquant eval perplexity` end to end, in a separate process as a user runs it."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest


def _llmquant(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmquant", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_json_output_is_the_result_and_nothing_else(tiny_model_dir, tmp_path):
    output = tmp_path / "ppl.json"
    proc = _llmquant("eval", "perplexity", str(tiny_model_dir), "--max-tokens", "2000", "--json",
                     "--output", str(output))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # fails if anything else was printed on stdout
    assert json.loads(output.read_text()) == result
    assert math.isclose(result["perplexity"], math.exp(result["nll_per_token"]), rel_tol=1e-9)
    method = result["method"]
    assert method["max_tokens"] == 2000 and method["num_tokens"] == 2000
    assert method["window"] == 512 and method["stride"] == 512  # the tiny model's context
    assert result["num_tokens_scored"] == 2000 - method["num_windows"]
    assert len(result["per_window"]) == method["num_windows"] == 4
    assert result["bits_per_byte"] > 0 and result["seconds"] > 0
    assert str(tiny_model_dir.name) in result["model"]
    assert "perplexity" in proc.stderr  # the progress bar goes to stderr


def test_summary_output_and_a_clear_error(tiny_model_dir, tmp_path, capsys, one_thread):
    from llmquant.cli import main

    # In-process (the subprocess test above covers the real entry point): same parser and
    # handler, without paying for a second interpreter start.
    assert main(["eval", "perplexity", str(tiny_model_dir), "--max-tokens", "600",
                 "--window", "256", "--stride", "128"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("perplexity ")
    assert "bits/byte" in out and "256-token windows, stride 128" in out

    missing = tmp_path / "missing.jsonl"
    assert main(["eval", "perplexity", str(tiny_model_dir), "--dataset", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in " ".join(err.split())
    assert "Traceback" not in err


@pytest.mark.demo
def test_demo_model_perplexity_on_real_text_is_plausible(demo_model_dir):
    from llmquant.eval import perplexity

    result = perplexity(str(demo_model_dir), max_tokens=4096, dtype="float32", progress=False)
    # A real 135M model on English technical prose: far better than chance (49,152 tokens),
    # far worse than a memorized text.
    assert 5 < result.perplexity < 30
    assert result.method["window"] == 1024 and result.num_tokens_scored == 4096 - 4
    assert 0.3 < result.bits_per_byte < 1.5
