"""`llmquant quantize --push-to-hub`: quantize, save, then publish the folder with its card; a
missing token fails before any work."""

from __future__ import annotations

from llmquant.cli import main


def test_quantize_push_to_hub_publishes_the_saved_folder(hub_env, tiny_model_dir, tmp_path, upload_hub, capsys):
    out = tmp_path / "q"
    code = main(["quantize", str(tiny_model_dir), "--scheme", "W8A16", "--no-verify", "-q", "-o", str(out),
                 "--push-to-hub", "me/tiny-W8A16", "--private"])
    assert code == 0, capsys.readouterr().err
    repo = upload_hub.repos["me/tiny-W8A16"]
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert repo.private and repo.head("main").files == files
    card = files["README.md"].decode()
    assert "- w8a16\n" in card and "base_model_relation" not in card  # a local source: no base model known
    assert f"commit: {upload_hub.url}/me/tiny-W8A16/commit/{repo.head('main').oid}" in capsys.readouterr().out


def test_quantize_push_without_token_fails_before_the_work(hub_env, tiny_model_dir, tmp_path, capsys, hub_consts):
    hub_env.delenv("HF_TOKEN")
    out = tmp_path / "never"
    code = main(["quantize", str(tiny_model_dir), "--scheme", "W8A16", "-q", "-o", str(out),
                 "--push-to-hub", "me/never"])
    err = capsys.readouterr().err
    assert code == 2 and "No Hugging Face token to push me/never" in err and "Traceback" not in err
    assert not out.exists()
