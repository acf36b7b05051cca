"""CPU matmul paths for quantized layers, timed against a dense float32 matmul in the same run.

Shapes are the demo model's MLP (576 -> 1536). For each scheme and number of rows M it times:
the kernel llmquant selects (`QuantizedLinear.forward`), the low-bit torch kernel fed float32
activations, the same kernel fed bfloat16 activations, and dequantize-then-matmul. These
numbers are why kernels.py routes as it does.

    python benchmarks/kernels_cpu.py      # writes benchmarks/results/kernels_cpu.{json,md}
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmquant.config.args import QuantArgs
from llmquant.kernels.registry import select_kernel
from llmquant.quant.linear import QuantizedLinear
from llmquant.config.presets import PRESETS

RESULTS = Path(__file__).parent / "results"
ROWS = (1, 4, 16, 64, 256, 512)
IN_F, OUT_F = 576, 1536


def timeit(fn, budget_s: float = 0.3) -> float:
    """Median milliseconds per call over repeated batches of calls."""
    fn()
    t = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t, 1e-6)
    reps = max(1, min(200, int(0.05 / once)))
    samples = []
    end = time.perf_counter() + budget_s
    while time.perf_counter() < end or len(samples) < 3:
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - t) / reps * 1e3)
    return statistics.median(samples)


def layer(name: str) -> QuantizedLinear:
    scheme = PRESETS[name]
    if scheme.weights.strategy == "group":
        scheme = scheme.replace(weights=QuantArgs(**{**scheme.weights.to_dict(), "group_size": 64}))
    torch.manual_seed(0)
    lin = torch.nn.Linear(IN_F, OUT_F, bias=False)
    scale_dtype = torch.bfloat16 if scheme.format == "pack-quantized" else torch.float32
    return QuantizedLinear.from_float(lin, scheme, scale_dtype=scale_dtype)


def main() -> int:
    torch.manual_seed(0)
    dense_w = torch.randn(OUT_F, IN_F)
    rows_out = []
    with torch.inference_mode():
        for name in ("W4A16", "W8A16", "FP8_W"):
            q = layer(name)
            for m in ROWS:
                x = torch.randn(m, IN_F)
                row = {"scheme": name, "rows": m,
                       "dense_fp32_ms": timeit(lambda: F.linear(x, dense_w)),
                       "llmquant_ms": timeit(lambda: q(x)),
                       "selected_kernel": select_kernel(q, x).name,
                       "dequant_matmul_ms": timeit(lambda: F.linear(x, q.dequantized_weight(torch.float32)))}
                if name == "W4A16":
                    from llmquant.kernels.registry import Int4PackCpu

                    k = Int4PackCpu(q, x.device, torch.float32)
                    row["int4pack_bf16_ms"] = timeit(lambda: k(x))
                    row["int4pack_fp32_ms"] = timeit(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                        x, k.packed, k.group, k.scales_and_zeros.float()), budget_s=0.1)
                if name == "W8A16":
                    w8, s = q.int_weight().contiguous(), q.weight_scale.reshape(-1)
                    row["int8pack_bf16_ms"] = timeit(lambda: torch._weight_int8pack_mm(
                        x.to(torch.bfloat16), w8, s.to(torch.bfloat16)))
                    row["int8pack_fp32_ms"] = timeit(lambda: torch._weight_int8pack_mm(x, w8, s.float()),
                                                     budget_s=0.1)
                rows_out.append(row)
                print(row, flush=True)
    meta = {"machine": f"{platform.machine()} {platform.processor()}".strip(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "shape": f"{IN_F}->{OUT_F}", "command": "python " + " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kernels_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=2) + "\n")
    cols = ["dense_fp32_ms", "llmquant_ms", "dequant_matmul_ms", "int4pack_bf16_ms", "int4pack_fp32_ms",
            "int8pack_bf16_ms", "int8pack_fp32_ms"]
    lines = ["# CPU matmul paths for a 576x1536 quantized layer (milliseconds, median)", "",
             "| scheme | M | selected kernel | " + " | ".join(c.removesuffix("_ms") for c in cols) + " |",
             "|---|---:|---|" + "---:|" * len(cols)]
    for r in rows_out:
        cells = [f"{r[c]:.3f}" if c in r else "" for c in cols]
        lines.append(f"| {r['scheme']} | {r['rows']} | {r['selected_kernel']} | " + " | ".join(cells) + " |")
    lines += ["", f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads. "
              f"Command: `{meta['command']}`", ""]
    (RESULTS / "kernels_cpu.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
