"""Memory of a serving process on CPU: the demo model's W4A16 folder loaded, then an engine built
on it and one request served, with llmquant's CPU decode kernels and with torch's kernels
(LLMQUANT_CPU_KERNELS=0). Each measurement runs in its own fresh process; numbers are RSS
growth over that process before loading (psutil).

    python benchmarks/serve_memory.py     # ~2 min; writes benchmarks/results/serve_memory.{json,md}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CHILD = r"""
import json, sys
import psutil
from llmquant.kernels import cpu_ext
cpu_ext.load()  # the kernels' own code is not the model's memory
process = psutil.Process()
start = process.memory_info().rss
from llmquant import load_model
from llmquant.serve.engine import Engine
from llmquant.serve.sampling import SamplingParams
loaded = load_model(sys.argv[1], dtype="bfloat16")
after_load = process.memory_info().rss
engine = Engine(loaded, max_batch_size=1)
after_engine = process.memory_info().rss
for _ in engine.generate(list(range(100, 132)), SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)):
    pass
after_request = process.memory_info().rss
engine.shutdown()
print(json.dumps({"forward": engine.forward.name,
                  "loaded_mb": (after_load - start) / 1e6, "engine_mb": (after_engine - start) / 1e6,
                  "after_request_mb": (after_request - start) / 1e6}))
"""


def main() -> int:
    from llmquant import quantize
    from llmquant.loading.demo import ensure_demo_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="llmquant-memory-") as work:
        folder = Path(work) / "W4A16"
        quantize(ensure_demo_model(), output=folder, verify=False, progress=False, scheme="W4A16", group_size=64)
        file_mb = (folder / "model.safetensors").stat().st_size / 1e6
        for label, switch in (("llmquant CPU decode kernels", "1"), ("torch's kernels", "0")):
            env = {**os.environ, "LLMQUANT_CPU_KERNELS": switch}
            out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], env=env, capture_output=True,
                                 text=True, check=True)
            rows.append({"kernels": label, **json.loads(out.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    from serving_servers import cpu_facts, git_commit  # benchmarks/ is this script's sys.path[0]

    meta = {"model": "SmolLM2-135M-Instruct W4A16 group 64", "file_mb": file_mb, "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/serve_memory.py", "commit": git_commit(), **cpu_facts()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# Serving memory on CPU (demo model, W4A16 group 64)", "",
             f"RSS growth of a fresh process, MB; checkpoint file {file_mb:.0f} MB. CPU: {meta['cpu']} "
             f"({', '.join(meta['cpu_flags'])}); on CPUs with AMX the engine also keeps the AMX tile layout of the "
             "4-bit weights and of the INT8 head.", "",
             "| kernels | forward | loaded | engine built | after one request |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['kernels']} | {r['forward']} | {r['loaded_mb']:.0f} | {r['engine_mb']:.0f} | "
              f"{r['after_request_mb']:.0f} |" for r in rows]
    lines += ["", f"Command: `{meta['command']}` ({meta['date']}, {meta['commit']}).", ""]
    (RESULTS / "serve_memory.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
