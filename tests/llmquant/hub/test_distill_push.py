"""`llmquant distill --push-to-hub`: train, save, then publish the student with a card that
names the relation; a missing token fails before any training."""

from __future__ import annotations

from llmquant.cli import main


def test_distill_push_to_hub_publishes_the_student(hub_env, tiny_model_dir, tmp_path, upload_hub, capsys):
    out = tmp_path / "student"
    code = main(["distill", str(tiny_model_dir), "--student-layers", "1", "--steps", "1", "--batch-size", "1",
                 "--seq-len", "16", "--eval-every", "0", "--dtype", "float32", "-q", "-o", str(out),
                 "--push-to-hub", "me/tiny-student"])
    assert code == 0, capsys.readouterr().err
    repo = upload_hub.repos["me/tiny-student"]
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert repo.head("main").files == files and "distill_report.json" in files
    assert "base_model_relation: distillation" not in files["README.md"].decode()  # a local teacher: no base model
    assert f"pushed to {upload_hub.url}/me/tiny-student/commit/{repo.head('main').oid}" in capsys.readouterr().out


def test_distill_push_without_token_fails_before_training(hub_env, tiny_model_dir, tmp_path, capsys):
    hub_env.delenv("HF_TOKEN")
    out = tmp_path / "never"
    code = main(["distill", str(tiny_model_dir), "--student-layers", "1", "--steps", "1", "-q", "-o", str(out),
                 "--push-to-hub", "me/never"])
    err = capsys.readouterr().err
    assert code == 2 and "No Hugging Face token to push me/never" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "never.checkpoints").exists()
