"""`llmquant quantize` as users run it: a real process, its exit codes and its messages."""

import json
import subprocess
import sys

import pytest

FAST = ["--num-samples", "4", "--seq-len", "64", "--verify-tokens", "256", "-q", "--dtype", "float32"]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmquant", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def assert_clean_error(proc, *phrases):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    flat = " ".join(proc.stderr.split())
    for phrase in phrases:
        assert phrase in flat, flat


def test_quantize_then_refuse_to_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "w8a8"
    proc = run_cli("quantize", tiny_model_dir, "--scheme", "W8A8", "--output", out, *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "verification (reloaded checkpoint vs original): mean KL" in proc.stdout
    assert "worst 5 layers:" in proc.stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"
    before = (out / "model.safetensors").read_bytes()

    again = run_cli("quantize", tiny_model_dir, "--scheme", "W8A8", "--output", out, *FAST)
    assert_clean_error(again, "already exists", "--overwrite")
    assert (out / "model.safetensors").read_bytes() == before  # nothing lost


def test_default_output_name_and_percentile_observer(tiny_model_dir, tmp_path):
    proc = run_cli("quantize", tiny_model_dir, "--scheme", "fp8", "--observer", "percentile",
                   "--percentile", "99.9", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / f"{tiny_model_dir.name}-FP8"
    report = json.loads((out / "quantization_report.json").read_text())
    clipped = [layer["activation_clip_pct"] for layer in report["layers"]]
    assert all(0.0 < c < 0.5 for c in clipped)  # a 99.9th percentile clips about 0.1%
    assert report["recipe"]["quantize"]["input_activations"]["percentile"] == 99.9


def test_group_size_that_does_not_fit_names_the_layers(tiny_model_dir, tmp_path):
    proc = run_cli("quantize", tiny_model_dir, "--scheme", "W4A16", "--group-size", "96",
                   "--output", tmp_path / "x", *FAST)
    assert_clean_error(proc, "does not divide", "model.layers.0.self_attn.q_proj (width 128)",
                       "--group-size-fallback")
    assert not (tmp_path / "x").exists()


def test_bad_recipe_names_the_key(tiny_model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quantize:\n  scheme: W8A16\n  weights: {bits: 4}\n")
    proc = run_cli("quantize", tiny_model_dir, "--recipe", recipe, "--output", tmp_path / "x", *FAST)
    assert_clean_error(proc, "'bits'", "valid keys:")


def test_help_explains_schemes_and_observers():
    proc = run_cli("quantize", "--help")
    assert proc.returncode == 0
    for word in ("W8A16", "W4A16", "W8A8", "FP8_DYNAMIC", "FP8_W", "percentile", "mse", "--overwrite"):
        assert word in proc.stdout


def test_gptq_refinement_flags_reach_the_saved_recipe(tiny_model_dir, tmp_path):
    out = tmp_path / "g"
    proc = run_cli("quantize", tiny_model_dir, "--scheme", "W4A16", "--group-size", "32", "--no-act-order",
                   "--gptq-refit-rounds", "2", "--no-weighted-clipping", "--output", out, "--no-verify", *FAST)
    assert proc.returncode == 0, proc.stderr
    gptq = json.loads((out / "quantization_report.json").read_text())["recipe"]["gptq"]
    assert gptq == {"block_size": 128, "dampening": 0.01, "act_order": False, "weighted_clipping": False,
                    "refit_rounds": 2}
    clash = run_cli("quantize", tiny_model_dir, "--scheme", "W4A16", "--no-gptq", "--gptq-refit-rounds", "1",
                    "--output", tmp_path / "x", *FAST)
    assert_clean_error(clash, "--no-gptq")


def test_moe_summary_states_coverage_and_warns_when_experts_are_left_out(architecture_dir, tmp_path):
    """The summary gives the share quantized and what was kept, and why; leaving the experts out
    (most of a MoE's weights) ends the output with a warning."""
    model = architecture_dir("mixtral")
    full = run_cli("quantize", model, "--scheme", "W4A16", "--output", tmp_path / "all", *FAST)
    assert full.returncode == 0, full.stderr
    assert "quantized 86.8% of the 254,784 non-embedding parameters" in full.stdout
    assert "model.layers.*.mlp.gate x2 (512 parameters): router, default" in full.stdout
    assert "WARNING" not in full.stdout
    partial = run_cli("quantize", model, "--scheme", "W4A16", "--ignore", "lm_head", "re:.*block_sparse_moe.experts.*",
                      "--output", tmp_path / "attention-only", *FAST)
    assert partial.returncode == 0, partial.stderr
    lines = partial.stdout.strip().splitlines()
    assert "model.layers.*.mlp.experts.*.w1 x8 (65,536 parameters): ignore 're:.*block_sparse_moe.experts.*' " \
           "(--ignore)" in partial.stdout
    assert lines[-1].startswith("WARNING: only 9.6% of the non-embedding parameters were quantized")


def run_main(capsys, *args) -> tuple[int, str, str]:
    """`llmquant ...` in this process (no interpreter start): exit code, stdout, stderr."""
    from llmquant.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("text, phrase", [
    ("quantize: [1, 2]\n", "quantize must be a mapping such as {scheme: W4A16}; got the list [1, 2]."),
    ("quantize: {scheme: W8A16}\ncalibration: {num_samples: many}\n",
     'calibration.num_samples must be an integer; got the string "many".'),
    ('quantize: {scheme: W8A16, weights: {num_bits: "4"}}\n',
     'quantize.weights.num_bits must be an integer, one of 4, 8; got the string "4".'),
    ("quantize: {scheme: W8A16, ignore: [[lm_head]]}\n", "quantize.ignore must be a list of strings"),
])
def test_recipe_type_mistakes_are_one_paragraph_errors(tiny_model_dir, tmp_path, capsys, text, phrase):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    code, _, err = run_main(capsys, "quantize", tiny_model_dir, "--recipe", recipe, "--output", tmp_path / "x", *FAST)
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert phrase in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # nothing written


def test_ignore_written_as_one_string_keeps_that_layer(tiny_model_dir, tmp_path, capsys):
    """`ignore: lm_head` is the pattern lm_head, not the letters l, m, _, h, e, a, d."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quantize: {scheme: W8A16, ignore: lm_head}\n")
    code, _, err = run_main(capsys, "quantize", tiny_model_dir, "--recipe", recipe, "--output", tmp_path / "q",
                            "--no-verify", *FAST)
    assert code == 0, err
    report = json.loads((tmp_path / "q" / "quantization_report.json").read_text())
    assert report["recipe"]["quantize"]["ignore"] == ["lm_head"]
    assert "lm_head" not in {layer["name"] for layer in report["layers"]}
    assert len(report["layers"]) == 14  # every decoder projection still quantized


@pytest.mark.parametrize("where", ["file", "proc"])
def test_an_output_that_cannot_be_created_fails_before_any_work(tiny_model_dir, tmp_path, where):
    """A parent that is a regular file, or a folder nobody may create entries in (/proc refuses root
    too): exit 2 with one paragraph, before the model is loaded, and nothing written."""
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    output = in_the_way / "out" if where == "file" else f"/proc/llmquant-test-{tmp_path.name}/out"
    proc = run_cli("quantize", tiny_model_dir, "--scheme", "W8A16", "--output", output, *FAST)
    assert_clean_error(proc, "Cannot create the output folder", "Choose another --output")
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "Loading weights" not in proc.stderr  # refused before the model was read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and in_the_way.read_text() == "not a folder"
