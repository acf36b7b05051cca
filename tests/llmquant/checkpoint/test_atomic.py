"""Atomic output folders: an interrupted write never leaves a complete-looking folder."""

import os
import stat

import pytest

from llmquant.checkpoint.atomic import PARTIAL_MARK, atomic_directory
from llmquant.errors import OutputExistsError


def test_success_renames_into_place_with_readable_files(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        assert not target.exists()
        f = tmp / "model.safetensors"
        f.write_bytes(b"x")
        os.chmod(f, 0o600)  # as some writers leave it
    assert (target / "model.safetensors").read_bytes() == b"x"
    assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) & 0o044  # umask decides, not 0600
    assert not any(PARTIAL_MARK in p.name for p in tmp_path.iterdir())


def test_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite_and_survives_a_failed_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with atomic_directory(target):
            pass
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("crash")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
