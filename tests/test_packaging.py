"""The installed layout: every package folder is listed in pyproject.toml (package-dir renames
serve/ and eval/, so setuptools cannot discover them), and a user's own folder named serve/ or
eval/ never shadows ours."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _package_folders() -> dict[str, Path]:
    folders = {"llmquant": ROOT / "llmquant", "llmquant.serve": ROOT / "serve", "llmquant.eval": ROOT / "eval"}
    found = {}
    for name, top in folders.items():
        # Every folder that holds files ships: Python packages and data-only folders alike.
        for folder in (top, *(d for d in top.rglob("*") if d.is_dir() and d.name != "__pycache__")):
            if any(f.is_file() and f.suffix != ".pyc" for f in folder.iterdir()):
                parts = folder.relative_to(top).parts
                found[".".join((name, *parts))] = folder
    return found


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(config["packages"]) == sorted(_package_folders())


def test_a_local_folder_named_eval_or_serve_does_not_shadow_ours(tmp_path):
    for name in ("eval", "serve"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("SHADOW = True\n")
    code = ("import llmquant.eval, llmquant.serve; "
            "print(llmquant.eval.__file__); print(llmquant.serve.__file__); "
            "from llmquant.eval import perplexity; print(callable(perplexity))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    eval_file, serve_file, is_function = out.stdout.split()
    assert Path(eval_file) == ROOT / "eval" / "__init__.py"
    assert Path(serve_file) == ROOT / "serve" / "__init__.py"
    assert is_function == "True"
