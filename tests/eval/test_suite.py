"""Eval suites on tiny models: config validation, results.json, report.md, plots, reuse, failures."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from llmquant.eval import perplexity
from llmquant.eval.suite import SuiteConfig, run_suite
from llmquant.errors import InvalidConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_unknown_keys_are_rejected_with_the_valid_ones():
    with pytest.raises(InvalidConfigError, match=r"Unknown key\(s\) 'sorce'.*valid keys: .*source"):
        SuiteConfig.from_dict({"models": [{"name": "a", "sorce": "x"}], "tasks": [{"task": "perplexity"}]})
    with pytest.raises(InvalidConfigError, match=r"'windw'.*valid keys: .*window"):
        SuiteConfig.from_dict({"models": [{"name": "a"}], "tasks": [{"task": "perplexity", "windw": 8}]})
    with pytest.raises(InvalidConfigError, match="valid tasks: perplexity, agreement, throughput, load"):
        SuiteConfig.from_dict({"models": [{"name": "a"}], "tasks": [{"task": "mmlu"}]})
    with pytest.raises(InvalidConfigError, match=r"'scheem'.*valid keys: .*scheme"):
        SuiteConfig.from_dict({"models": [{"name": "a", "quantize": {"scheem": "W8A8"}}], "tasks": [{"task": "load"}]})
    with pytest.raises(InvalidConfigError, match="base 'zz' is not a model"):
        SuiteConfig.from_dict({"models": [{"name": "a"}], "tasks": [{"task": "agreement", "base": "zz"}]})
    with pytest.raises(InvalidConfigError, match="cannot be combined"):
        SuiteConfig.from_dict({"models": [{"name": "a", "url": "http://x/v1", "bitsandbytes": "nf4"}],
                               "tasks": [{"task": "load"}]})


def test_data_options_of_a_task_are_type_checked_when_the_suite_is_read():
    # The same EvalData checks as the Python API and the CLI, before any model is loaded.
    with pytest.raises(InvalidConfigError, match='task ppl-long: max_tokens must be an integer or null; got the '
                                                 'string "many"'):
        SuiteConfig.from_dict({"models": [{"name": "a"}],
                               "tasks": [{"task": "perplexity", "name": "ppl-long", "max_tokens": "many"}]})
    with pytest.raises(InvalidConfigError, match="task agreement: stride must be at least 1 and at most the window"):
        SuiteConfig.from_dict({"models": [{"name": "a"}, {"name": "b"}],
                               "tasks": [{"task": "agreement", "window": 64, "stride": 128}]})


def test_shipped_suites_load_and_round_trip():
    from pathlib import Path

    files = sorted((Path(__file__).parents[2] / "configs" / "eval").glob("*.yaml"))
    assert {f.stem for f in files} >= {"demo", "bitsandbytes", "server"}
    for f in files:
        config = SuiteConfig.load(f)
        assert SuiteConfig.from_dict(config.to_dict()) == config
    demo = SuiteConfig.load(Path(__file__).parents[2] / "configs" / "eval" / "demo.yaml")
    assert [m.quantize["scheme"] for m in demo.models if m.quantize] == ["W8A8", "FP8_DYNAMIC", "W4A16_ASYM"]


@pytest.fixture(scope="module")
def suite_run(tiny_model_dir, tmp_path_factory, one_thread):
    """One suite over the tiny model, a quantized variant, bitsandbytes NF4 and a broken folder, run
    through the CLI as a user runs it."""
    from llmquant.cli import main

    root = tmp_path_factory.mktemp("suite")
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    suite = {
        "name": "tiny-suite",
        "models": [
            {"name": "base", "source": str(tiny_model_dir), "dtype": "float32"},
            {"name": "w8", "source": str(tiny_model_dir), "dtype": "float32",
             "quantize": {"scheme": "W8A16", "verify": False}, "tasks": ["perplexity", "agreement", "throughput"]},
            {"name": "nf4", "source": str(tiny_model_dir), "bitsandbytes": "nf4", "dtype": "float32",
             "tasks": ["perplexity"]},
            {"name": "broken", "source": str(broken)},
        ],
        "tasks": [
            {"task": "perplexity", "max_tokens": 512, "window": 128},
            {"task": "agreement", "max_tokens": 256, "window": 128},
            {"task": "throughput", "prefill_lengths": [32], "batch_sizes": [1, 2], "decode_tokens": 3,
             "prompt_tokens": 8},
            {"task": "load", "concurrency": [1, 2], "num_prompts": 2, "input_len": 8, "output_len": 3},
        ],
    }
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = root / "out"
    code = main(["eval", "suite", str(path), "--output", str(out), "--quiet"])
    return path, out, code


def _entries(out):
    results = json.loads((out / "results.json").read_text())
    return results, {(e["model"], e["task"]): e for e in results["results"]}


def test_results_json_records_every_model_and_task(suite_run, tiny_model_dir):
    _, out, code = suite_run
    assert code == 1  # the broken model failed
    results, entries = _entries(out)
    assert results["version"] == 1 and len(results["results"]) == 16
    env = results["environment"]
    for key in ("llmquant", "torch", "transformers", "python", "device", "torch_threads", "cpu_count"):
        assert env[key] is not None
    status = {k: e["status"] for k, e in entries.items()}
    assert status[("base", "agreement")] == "skipped"  # it is the base
    assert status[("w8", "load")] == status[("nf4", "throughput")] == "skipped"  # not among their tasks
    for task in ("perplexity", "agreement", "throughput", "load"):
        assert status[("broken", task)] == "error"
        assert "model_type" in entries[("broken", task)]["error"]
    ok = [k for k, s in status.items() if s == "ok"]
    assert set(ok) == {("base", "perplexity"), ("base", "throughput"), ("base", "load"), ("w8", "perplexity"),
                       ("w8", "agreement"), ("w8", "throughput"), ("nf4", "perplexity")} or \
        entries[("nf4", "perplexity")]["status"] == "skipped"  # where bitsandbytes cannot run: a skip note
    # The suite's numbers are the library's numbers.
    direct = perplexity(str(tiny_model_dir), max_tokens=512, window=128, dtype="float32", progress=False)
    assert entries[("base", "perplexity")]["result"]["perplexity"] == pytest.approx(direct.perplexity, rel=1e-9)
    w8 = entries[("w8", "agreement")]["result"]
    assert 0 < w8["kl_mean"] < 0.01 and w8["top1_agreement"] > 0.5
    base_256 = perplexity(str(tiny_model_dir), max_tokens=256, window=128, dtype="float32", progress=False)
    assert w8["base_perplexity"] == pytest.approx(base_256.perplexity, rel=1e-6)
    runs = entries[("base", "load")]["result"]["runs"]
    assert [r["method"]["concurrency"] for r in runs] == [1, 2]
    assert all(r["completed"] == 2 and r["total_output_tokens"] == 6 for r in runs)
    sizes = {m["name"]: m.get("size_bytes") for m in results["models"]}
    assert sizes["w8"] < sizes["base"]


def test_report_has_a_row_per_model_and_the_deltas(suite_run):
    _, out, _ = suite_run
    _, entries = _entries(out)
    report = (out / "report.md").read_text()
    base = entries[("base", "perplexity")]["result"]["perplexity"]
    w8 = entries[("w8", "perplexity")]["result"]["perplexity"]
    assert f"| base | {base:.4f} | +0.00% |" in report
    assert f"| w8 | {w8:.4f} | {100 * (w8 / base - 1):+.2f}% |" in report
    assert "| broken | error |" in report
    for section in ("## perplexity", "## agreement", "## throughput", "## load", "## Failures and skips"):
        assert section in report
    assert "TTFT p50 / p90 / p99 ms" in report


def test_plots_are_real_images(suite_run):
    from PIL import Image

    _, out, _ = suite_run
    results, _ = _entries(out)
    assert sorted(results["plots"]) == ["plots/latency_percentiles.png", "plots/perplexity_vs_size.png",
                                        "plots/throughput_vs_concurrency.png"]
    for name in results["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        with Image.open(out / name) as image:
            assert image.width > 300 and image.height > 200


def test_a_rerun_reuses_what_did_not_change(suite_run):
    path, out, _ = suite_run
    _, before = _entries(out)
    results = run_suite(path, out, progress=False)
    after = {(e["model"], e["task"]): e for e in results["results"]}
    for key, entry in before.items():
        if entry["status"] == "ok":
            assert after[key]["reused"] is True
            assert after[key]["result"] == entry["result"]
    assert after[("broken", "perplexity")]["reused"] is False  # failures are tried again
    # Other parameters for one task: only that task is measured again.
    config = yaml.safe_load(path.read_text())
    config["tasks"][0]["max_tokens"] = 384
    config["models"] = config["models"][:1]
    changed = path.with_name("changed.yaml")
    changed.write_text(yaml.safe_dump(config))
    again = {e["task"]: e for e in run_suite(changed, out, progress=False)["results"]}
    assert again["perplexity"]["reused"] is False and again["perplexity"]["result"]["num_tokens_scored"] == 381
    assert again["throughput"]["reused"] is True and again["load"]["reused"] is True
    forced = {e["task"]: e for e in run_suite(changed, out, force=True, progress=False)["results"]
              if e["task"] == "perplexity" or e["status"] == "ok"}
    assert all(e["reused"] is False for e in forced.values())


def test_a_changed_model_folder_is_measured_again(tiny_model_dir, tmp_path, one_thread):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = SuiteConfig.from_dict({"models": [{"name": "m", "source": str(model), "dtype": "float32"}],
                                    "tasks": [{"task": "perplexity", "max_tokens": 128, "window": 64}]})
    assert run_suite(config, tmp_path / "out", progress=False)["results"][0]["reused"] is False
    assert run_suite(config, tmp_path / "out", progress=False)["results"][0]["reused"] is True
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert run_suite(config, tmp_path / "out", progress=False)["results"][0]["reused"] is False
