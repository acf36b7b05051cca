"""The CPU decode kernels (cpu_decode*.cpp / .h), compiled for this machine at first use.

`load()` returns the compiled module, or None when it cannot be had (no C++ compiler, no
ninja, a build error, or LLMQUANT_CPU_KERNELS=0); callers then keep torch's own kernels, so a
machine without a toolchain is slower, never broken. The build is cached by torch under
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) and takes about a minute once.

It is compiled with -march=native, so its name carries a digest of this CPU's feature flags (a
cache shared between machines never hands one CPU code built for another) and of the sources,
header included (an edited header always rebuilds).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).parent / "csrc"
SOURCES = [HERE / name for name in ("cpu_decode_matmul.cpp", "cpu_amx_matmul.cpp", "cpu_dequantize.cpp",
                                           "cpu_decode_steps.cpp", "cpu_decode_stack.cpp")]
ENV_SWITCH = "LLMQUANT_CPU_KERNELS"


def _build_digest() -> str:
    flags = platform.machine() + "".join(p.read_text() for p in (*SOURCES, HERE / "cpu_decode.h"))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def _ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the ninja package installed with llmquant puts it in the
    environment's bin folder, which is not on PATH when the environment is not activated."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    path = os.environ.get("PATH", "")
    if bin_dir and bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = path + os.pathsep + bin_dir if path else bin_dir


def _build_directory(name: str) -> Path | None:
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(name, False))
    except Exception:  # a private helper of torch's: if it moves, only the notice and lock check are lost
        return None


def _built(name: str) -> bool:
    """Whether torch's extension cache already holds this build (then loading takes a moment)."""
    folder = _build_directory(name)
    return folder is None or (folder / f"{name}.so").exists()


# A build takes about a minute; a lock much older than that was left by a build that was killed
# (Ctrl-C, OOM, a timeout). torch waits on such a lock forever, so every later start would hang.
STALE_LOCK_SECONDS = 600


def _remove_stale_lock(name: str) -> None:
    folder = _build_directory(name)
    lock = folder / "lock" if folder is not None else None
    try:
        age = time.time() - lock.stat().st_mtime if lock is not None else 0.0
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        log.warning("removing a stale build lock of the CPU decode kernels (%s, %.0f min old: an earlier "
                    "build was interrupted)", lock, age / 60)
        lock.unlink(missing_ok=True)


@functools.cache
def load():
    """The compiled kernels module, or None (reason logged once)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("CPU decode kernels off (%s=0)", ENV_SWITCH)
        return None
    _ninja_on_path()
    name = f"llmquant_cpu_decode_{_build_digest()}"
    _remove_stale_lock(name)
    if not _built(name):
        log.warning("building llmquant's CPU decode kernels for this machine (once; about a minute)...")
    try:
        from torch.utils.cpp_extension import load as build

        module = build(name=name, sources=[str(p) for p in SOURCES],
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                       verbose=False)
    except Exception as exc:  # no compiler / ninja, or a build error: torch's kernels still work
        log.warning("CPU decode kernels unavailable (%s: %s); using torch's kernels", type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "")
        return None
    return module


def fast() -> object | None:
    """The module when its AVX-512 VNNI kernels are compiled in (the only case where they beat
    torch's kernels), else None."""
    module = load()
    return module if module is not None and module.fast_path() else None
