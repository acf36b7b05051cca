"""Where computation runs: device and dtype choice.

`dtype="auto"` means bfloat16 on CUDA and on CPUs with native bf16 arithmetic
(AVX512-BF16 or AMX), float32 on other CPUs. On an AVX2-only CPU a bf16 matmul is
emulated and measured 6x slower than float32 (512x576 @ 576x1536: 51 ms vs 8 ms on
2 cores), so float32 is both faster and more accurate there.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from llmquant.errors import InvalidConfigError

if TYPE_CHECKING:
    import torch

# Names, not torch dtypes: the CLI reads DTYPE_NAMES to build its flags, and importing torch
# (over a second) must wait until a command needs it.
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 dot-product instructions (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def describe_device() -> str:
    """The GPU's name, or the CPU's model name and vector extensions, for reports."""
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import platform

    return f"cpu: {name or platform.machine()} ({torch.backends.cpu.get_cpu_capability()})"


def default_device() -> torch.device:
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    import torch

    if device is None or device == "auto":
        return default_device()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfigError(
            f"Device {device!r} was requested but CUDA is not available on this machine; "
            "use --device cpu (or leave --device unset to choose automatically)."
        )
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Turn a dtype name (or "auto"/None) into a torch dtype for computing on `device`."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    try:
        return getattr(torch, _DTYPES[str(dtype).lower()])
    except KeyError:
        raise InvalidConfigError(
            f"Unknown dtype {dtype!r}; valid values: {', '.join(DTYPE_NAMES)}."
        ) from None
