"""Atomic folder writes: build the folder under a temporary name, rename it into place at the end.

A run that is interrupted (Ctrl-C, crash, full disk) leaves only a folder named
`.<name>.partial-<pid>-<random>` beside the target, never a folder at the target path that
looks complete. The temporary folder is in the same parent directory so that the final
`os.rename` is atomic on POSIX filesystems.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from llmquant.errors import OutputExistsError, OutputNotWritableError

PARTIAL_MARK = ".partial-"
PROBE_MARK = ".write-probe-"


def check_output_dir(target: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before hours of work) if `target` exists and may not be replaced, or if its
    folder could not be created there. Writes nothing that stays."""
    target = Path(target).expanduser().absolute()
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"The output folder {target} already exists. Pass --overwrite to replace it, "
            "or choose another --output."
        )
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"The output path {target} exists and is not a folder.")
    check_writable_parent(target)
    return target


def check_writable_parent(target: Path) -> None:
    """The folder is built beside `target` and renamed into place: its parent (or, where the
    parent does not exist yet, the nearest folder above it, where the parents will be made)
    must take a new entry. Permission bits do not say so for root or on read-only mounts, so a
    probe file is created and removed."""
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputNotWritableError(
            f"Cannot create the output folder {target}: {existing} is a file, not a folder. "
            "Choose another --output.")
    probe = existing / f"{PROBE_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as e:
        raise OutputNotWritableError(
            f"Cannot create the output folder {target}: {existing} is not writable ({e.strerror or e}). "
            "Choose another --output, or a folder you may write to.") from None
    os.close(fd)
    os.unlink(probe)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on normal exit it replaces `target` in one rename.

    On an exception the temporary folder is removed and `target` is left untouched.
    """
    target = check_output_dir(target, overwrite)
    tmp = target.parent / f".{target.name}{PARTIAL_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:  # the folder changed since the check
        raise OutputNotWritableError(f"Cannot create the output folder {target}: {e}. Choose another --output.") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _apply_umask(tmp)
    _replace(tmp, target, overwrite)


def _apply_umask(folder: Path) -> None:
    # Some writers (safetensors) create files 0600; a checkpoint folder should be readable by
    # whoever may read the folder, as the user's umask says.
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def _replace(tmp: Path, target: Path, overwrite: bool) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    if not overwrite:  # appeared while we worked
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputExistsError(f"The output folder {target} appeared while writing; nothing was replaced.")
    # Move the old folder aside first so that at every instant either the old or the new
    # complete folder sits at `target` (two renames; the gap between them has neither).
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
