"""Distillation recipes (YAML <-> object, unknown keys named) and the `llmquant distill` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmquant.distill.api import build_distill_recipe
from llmquant.distill.recipe import DistillRecipe
from llmquant.errors import InvalidConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs" / "distill").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_recipes_load_and_round_trip(path):
    rec = DistillRecipe.load(path)
    assert not rec.student.is_empty
    assert DistillRecipe.from_dict(rec.to_dict()) == rec
    import yaml

    assert DistillRecipe.from_dict(yaml.safe_load(rec.to_yaml())) == rec


def test_unknown_keys_and_bad_values_are_named():
    with pytest.raises(InvalidConfigError, match=r"'lr_max'.*valid keys: .*batch_size"):
        DistillRecipe.from_dict({"train": {"lr_max": 1.0}})
    with pytest.raises(InvalidConfigError, match=r"'teachers'.*valid keys: data, loss, qat, student, teacher, train"):
        DistillRecipe.from_dict({"teachers": {}})
    with pytest.raises(InvalidConfigError, match="forward_kl, reverse_kl, jsd"):
        DistillRecipe.from_dict({"loss": {"divergence": "kl"}})
    with pytest.raises(InvalidConfigError, match="online"):
        DistillRecipe.from_dict({"loss": {"hidden_weight": 1.0}, "teacher": {"mode": "offline"}})
    with pytest.raises(InvalidConfigError, match="at most 20"):
        DistillRecipe.from_dict({"teacher": {"mode": "offline", "endpoint": "http://x/v1", "top_k": 32}})
    with pytest.raises(InvalidConfigError, match="static activation"):
        DistillRecipe.from_dict({"qat": {"scheme": "FP8"}})


def test_arguments_override_the_recipe():
    rec = build_distill_recipe(CONFIGS[0], student_layers=10, steps=7, kd_weight=0.0, qat_scheme="w8a8")
    assert rec.student.num_layers == 10 and rec.train.steps == 7 and rec.loss.kd_weight == 0.0
    assert rec.qat.scheme == "W8A8"
    assert build_distill_recipe(teacher_endpoint="http://127.0.0.1:1/v1", top_k=5).teacher.mode == "offline"


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmquant", "distill", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_cli_trains_saves_and_refuses_to_overwrite(teacher_dir, tmp_path):
    out = tmp_path / "student"
    r = _cli(str(teacher_dir), "--student-layers", "2", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
             "--eval-every", "1", "--eval-tokens", "512", "--dtype", "float32", "--output", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "trained 2 steps" in r.stdout and "held-out perplexity at step 2" in r.stdout
    report = json.loads((out / "distill_report.json").read_text())
    assert len(report["student"]["kept_layers"]) == 2 and len(report["history"]) == 2
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    r = _cli(str(teacher_dir), "--student-layers", "2", "--steps", "2", "--output", str(out), "--quiet")
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr


def test_cli_errors_are_one_line(teacher_dir, tmp_path):
    r = _cli(str(teacher_dir), "--steps", "2", "--output", str(tmp_path / "x"))
    assert r.returncode == 2 and "--student-layers" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: {num_layers: 2}\ntrain: {stepz: 3}\n")
    r = _cli(str(teacher_dir), "--recipe", str(bad), "--output", str(tmp_path / "y"))
    assert r.returncode == 2 and "'stepz'" in r.stderr and "valid keys" in r.stderr
