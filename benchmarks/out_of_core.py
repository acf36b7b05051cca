"""Out-of-core quantization (issue 17): peak memory and time of the streamed path against the in-memory one.

The streamed path reads one decoder layer at a time from the safetensors shards, so a model
larger than memory can be quantized. This script measures what it costs and what it saves:

1. It writes a synthetic Llama-shaped checkpoint with random weights (seeded, normal with std
   0.02, norms ones, bf16): by default shaped like Llama-3.2-3B (hidden 3072, intermediate 8192,
   28 layers, 24 heads, 8 KV heads, untied embeddings; about 3.1B parameters, 6.2 GB) but with the
   demo model's tokenizer and vocabulary (49,152), in shards of about 2 GB with
   `model.safetensors.index.json`, tensor by tensor, so the writer never holds more than one shard.
   The folder is cached (default: under the temporary folder) and reused when an earlier run wrote
   it completely with the same settings (a marker file written last).
2. It quantizes that checkpoint to W4A16 group 128 with RTN (the scheme's default rounding) and with
   GPTQ (16 x 256 calibration tokens of the built-in corpus, through the demo tokenizer), once
   in memory (`--no-stream`) and once streamed (`--stream`), each run in a child process
   `python -m llmquant quantize ...`: its wall time and its peak RSS (`os.wait4`'s ru_maxrss),
   reported against the size of the bf16 checkpoint.
3. It does the same for the demo model (SmolLM2-135M-Instruct; in groups of 64, as its widths
   576 and 1536 need), and compares each pair of output folders tensor for tensor, the synthetic
   model's too: streaming must not change a single bit.
4. From llmquant's memory planner (`estimate_peaks`), the peaks it predicts for Llama-3.1-70B and
   Llama-3.1-405B (their config.json values) with GPTQ on 128 x 2048 calibration tokens.

Targets (set for the 3b size): streamed peak RSS <= 25% of the bf16 checkpoint (in memory needs
more than 100%); the streamed output identical to the in-memory one on the demo model; streamed
wall time <= 1.2x the in-memory path.

    python benchmarks/out_of_core.py                          # 3b synthetic + demo (hours on 2 cores; ~11 GB disk)
    python benchmarks/out_of_core.py --size tiny --methods rtn # a smoke test (a few minutes)
    python benchmarks/out_of_core.py --skip-synthetic          # only the demo model (its section re-measured)

Writes benchmarks/results/out_of_core.json and out_of_core.md (a model section that a run skips is
kept from the previous results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from speed import cpu_description  # noqa: E402
from synthetic_checkpoint import SIZES, checkpoint_bytes, ensure_synthetic, synthetic_shape  # noqa: E402

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
_GIB = 1024 ** 3

SCHEME, GROUP_SIZE = "W4A16", 128
# The demo model's widths (576, 1536) are not multiples of 128: it is quantized in groups of 64, the
# group size its other benchmarks use. Bit identity of the two paths does not depend on it.
DEMO_GROUP_SIZE = 64
CAL_SAMPLES, CAL_SEQ_LEN = 16, 256  # calibration of every measured run (builtin corpus, seed 0)
PLANNER_SAMPLES, PLANNER_SEQ_LEN = 128, 2048  # what the planner is asked for the large models
TARGET_STREAMED_OVER_CHECKPOINT = 0.25
TARGET_WALL_RATIO = 1.2
TARGET_SIZE = "3b"  # the targets are set for this size
METHODS = {"rtn": [], "gptq": ["--gptq"]}
PATHS = {"in-memory": False, "streamed": True}  # path name -> the --stream flag

# The planner's large models, from their config.json on the Hub (meta-llama/Llama-3.1-70B, -405B).
_LLAMA31 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
            "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
            "initializer_range": 0.02, "max_position_embeddings": 131072, "mlp_bias": False, "pretraining_tp": 1,
            "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
            "vocab_size": 128256}
LARGE_MODELS = {
    "Llama-3.1-70B": {**_LLAMA31, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8},
    "Llama-3.1-405B": {**_LLAMA31, "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                       "num_attention_heads": 128, "num_key_value_heads": 8},
}
def warm_page_cache(folder: Path) -> None:
    """Read the checkpoint once, so that the first measured run does not alone pay for the disk."""
    buf = bytearray(64 * 1024 * 1024)
    for p in sorted(folder.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# ---- one measured run ------------------------------------------------------------------------

def quantize_command(src: Path, out: Path, gptq: bool, stream: bool | None,
                     group_size: int = GROUP_SIZE) -> list[str]:
    """The measured command; stream None leaves the --stream/--no-stream flag out (llmquant's default)."""
    cmd = [sys.executable, "-m", "llmquant", "quantize", str(src), "--scheme", SCHEME, "--group-size",
           str(group_size)]
    if gptq:
        cmd.append("--gptq")
    cmd += ["--num-samples", str(CAL_SAMPLES), "--seq-len", str(CAL_SEQ_LEN), "--output", str(out), "--overwrite",
            "--no-verify"]
    if stream is not None:
        cmd.append("--stream" if stream else "--no-stream")
    return cmd


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _force_fork() -> None:
    """A preexec_fn: its presence makes subprocess fork() instead of vfork()/posix_spawn(). After a
    vfork the child's ru_maxrss starts at this process's own high-water mark (Linux keeps the larger
    of the old and new address space's at exec), so a child of a process that once held a 2 GB
    shard would report 2 GB however little it used; after fork() it starts at this process's
    current RSS (recorded with each run as parent_rss_at_spawn_bytes)."""


def run_measured(cmd: list[str], log_path: Path) -> dict:
    """Run `cmd` as a child process: wall time, peak RSS (ru_maxrss of the child), exit status."""
    parent_rss, load = _current_rss(), os.getloadavg()[0]
    with open(log_path, "wb") as log:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_force_fork)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    return {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "returncode": proc.returncode,
            "parent_rss_at_spawn_bytes": parent_rss, "load_average_before": load, "log": str(log_path)}


def baseline_rss(work: Path) -> int:
    """Peak RSS of a child that only imports what `llmquant quantize` runs on: the floor under every run."""
    cmd = [sys.executable, "-c", "import torch, transformers, safetensors, llmquant; from llmquant import quantize"]
    r = run_measured(cmd, work / "logs" / "baseline.log")
    if r["returncode"] != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{log_tail(Path(r['log']))}")
    return r["peak_rss_bytes"]


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---- output identity -------------------------------------------------------------------------

def _tensor_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (via the index when the folder is sharded)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    where = {}
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            where.update({k: p for k in f.keys()})
    return where


def compare_outputs(a: Path, b: Path, show: int = 10) -> dict:
    """Tensor-for-tensor comparison of two output folders, two tensors in memory at a time."""
    from safetensors import safe_open

    wa, wb = _tensor_files(a), _tensor_files(b)
    common = sorted(set(wa) & set(wb))
    differing = []
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}

        def get(path: Path, name: str) -> torch.Tensor:
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return handles[path].get_tensor(name)

        for name in common:
            x, y = get(wa[name], name), get(wb[name], name)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                differing.append(name)
    only_a, only_b = sorted(set(wa) - set(wb)), sorted(set(wb) - set(wa))
    qa = json.loads((a / "config.json").read_text()).get("quantization_config")
    qb = json.loads((b / "config.json").read_text()).get("quantization_config")
    return {"identical": not (differing or only_a or only_b), "tensors_compared": len(common),
            "differing": len(differing), "first_differences": differing[:show],
            "only_in_memory": only_a[:show], "only_streamed": only_b[:show],
            "quantization_config_equal": qa == qb}


# ---- the planner -----------------------------------------------------------------------------

def planner_row(name: str, config: dict, samples: int, seq_len: int, gptq: bool) -> dict:
    from llmquant.quant.pipeline.memory_plan import estimate_peaks

    peaks = estimate_peaks(config, samples, seq_len, gptq=gptq, dtype_bytes=2)
    return {"model": name, "samples": samples, "seq_len": seq_len, "gptq": gptq,
            "checkpoint_bytes": peaks.checkpoint_bytes, "in_memory_bytes": peaks.in_memory_bytes,
            "streamed_bytes": peaks.streamed_bytes,
            "streamed_over_checkpoint": peaks.streamed_bytes / peaks.checkpoint_bytes,
            "in_memory_over_checkpoint": peaks.in_memory_bytes / peaks.checkpoint_bytes,
            "describe": peaks.describe()}


# ---- one model: every method, both paths -----------------------------------------------------

def measure_model(label: str, src: Path, config: dict, methods: list[str], work: Path, keep: bool,
                  group_size: int) -> dict:
    """Quantize `src` with each method in memory and streamed; the runs, and each pair compared."""
    size = checkpoint_bytes(src)
    warm_page_cache(src)
    runs, pairs, failed = [], [], False
    for m, method in enumerate(methods):
        planned = planner_row(label, config, CAL_SAMPLES, CAL_SEQ_LEN, method == "gptq")
        order = list(PATHS) if m % 2 == 0 else list(reversed(PATHS))  # alternate: neither path always goes first
        outs = {}
        for path in order:
            out = work / f"{label}-{method}-{path}"
            cmd = quantize_command(src, out, method == "gptq", PATHS[path], group_size)
            print(f"{label} {method} {path}: {shlex.join(cmd[1:])}", flush=True)
            r = run_measured(cmd, work / "logs" / f"{label}-{method}-{path}.log")
            row = {"model": label, "method": method, "path": path, "group_size": group_size,
                   "checkpoint_bytes": size,
                   "peak_rss_bytes": r["peak_rss_bytes"], "peak_over_checkpoint": r["peak_rss_bytes"] / size,
                   "wall_s": r["wall_s"], "returncode": r["returncode"],
                   "parent_rss_at_spawn_bytes": r["parent_rss_at_spawn_bytes"],
                   "load_average_before": r["load_average_before"],
                   "planner_peak_bytes": planned["in_memory_bytes" if path == "in-memory" else "streamed_bytes"],
                   "command": shlex.join(["python"] + cmd[1:])}
            if r["returncode"] != 0:
                failed = True
                row["error"] = log_tail(Path(r["log"]))
                print(f"{label} {method} {path}: FAILED (exit status {r['returncode']}); log {r['log']}, its end:\n"
                      f"{row['error']}", file=sys.stderr, flush=True)
            else:
                outs[path] = out
                row["output_bytes"] = checkpoint_bytes(out)
                print(f"{label} {method} {path}: peak RSS {r['peak_rss_bytes'] / _GIB:.2f} GiB = "
                      f"{100 * row['peak_over_checkpoint']:.0f}% of the checkpoint ({size / _GIB:.2f} GiB), "
                      f"{r['wall_s']:.0f} s", flush=True)
            runs.append(row)
        pair = {"model": label, "method": method}
        done = {r["path"]: r for r in runs if r["method"] == method and r["returncode"] == 0}
        if len(done) == 2:
            pair["wall_ratio"] = done["streamed"]["wall_s"] / done["in-memory"]["wall_s"]
            pair["peak_ratio"] = done["streamed"]["peak_rss_bytes"] / done["in-memory"]["peak_rss_bytes"]
            pair.update(compare_outputs(outs["in-memory"], outs["streamed"]))
            print(f"{label} {method}: streamed/in-memory wall {pair['wall_ratio']:.2f}x, peak "
                  f"{pair['peak_ratio']:.2f}x; outputs {'identical' if pair['identical'] else 'DIFFER'} "
                  f"({pair['tensors_compared']} tensors"
                  + (f"; first: {', '.join(pair['first_differences'][:3])}" if pair["differing"] else "") + ")",
                  flush=True)
        pairs.append(pair)
        if not keep:
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
    return {"runs": runs, "pairs": pairs, "checkpoint_bytes": size, "failed": failed}


# ---- results ---------------------------------------------------------------------------------

def targets(sections: dict) -> dict:
    """Each target: what was measured and whether it is met (None: not measured)."""
    syn, demo = sections.get("synthetic"), sections.get("demo")
    result = {}

    def runs(section, path):
        return [r for r in (section or {}).get("runs", []) if r["path"] == path and r["returncode"] == 0]

    streamed, in_memory = runs(syn, "streamed"), runs(syn, "in-memory")
    worst = max((r["peak_over_checkpoint"] for r in streamed), default=None)
    result["streamed_peak"] = {
        "target": f"streamed peak RSS <= {100 * TARGET_STREAMED_OVER_CHECKPOINT:.0f}% of the bf16 checkpoint "
                  "(synthetic model)",
        "measured": worst, "per_method": {r["method"]: r["peak_over_checkpoint"] for r in streamed},
        "in_memory_per_method": {r["method"]: r["peak_over_checkpoint"] for r in in_memory},
        "in_memory_over_100pct": all(r["peak_over_checkpoint"] > 1.0 for r in in_memory) if in_memory else None,
        "size": (syn or {}).get("size"),
        "met": None if worst is None else worst <= TARGET_STREAMED_OVER_CHECKPOINT}
    demo_pairs = [p for p in (demo or {}).get("pairs", []) if "identical" in p]
    result["identical_output"] = {
        "target": "streamed output identical to the in-memory output (demo model)",
        "per_method": {p["method"]: p["identical"] for p in demo_pairs},
        "met": all(p["identical"] for p in demo_pairs) if demo_pairs else None}
    syn_pairs = [p for p in (syn or {}).get("pairs", []) if "wall_ratio" in p]
    ratio = max((p["wall_ratio"] for p in syn_pairs), default=None)
    result["wall_time"] = {
        "target": f"streamed wall time <= {TARGET_WALL_RATIO}x the in-memory path (synthetic model)",
        "measured": ratio, "per_method": {p["method"]: p["wall_ratio"] for p in syn_pairs},
        "size": (syn or {}).get("size"),
        "met": None if ratio is None else ratio <= TARGET_WALL_RATIO}
    return result


def _met(value) -> str:
    return "not measured" if value is None else ("met" if value else "**not met**")


def _gib(n) -> str:
    return f"{n / _GIB:.2f}"


def write_results(data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "out_of_core.json").write_text(json.dumps(data, indent=2) + "\n")
    meta, t = data["meta"], data["targets"]
    syn = data["models"].get("synthetic")
    lines = ["# Out-of-core quantization: streamed vs in-memory", "",
             f"Each run is `python -m llmquant quantize` in a child process: {SCHEME} in groups of {GROUP_SIZE} "
             f"(the demo model: {DEMO_GROUP_SIZE}, as its widths 576 and 1536 need), RTN (the scheme's default "
             f"rounding) or GPTQ on {CAL_SAMPLES} x {CAL_SEQ_LEN} calibration tokens of the built-in "
             "corpus; `--no-stream` loads the whole model, `--stream` reads one decoder layer at a time from the "
             "shards. Peak RSS: the child's ru_maxrss (`os.wait4`), over the size of the bf16 source checkpoint "
             "(its .safetensors files).", ""]
    if syn:
        c = syn["config"]
        lines += [f"Synthetic model ({syn['size']}): LlamaForCausalLM with random weights, hidden {c['hidden_size']}, "
                  f"intermediate {c['intermediate_size']}, {c['num_hidden_layers']} layers, "
                  f"{c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads, the demo tokenizer's "
                  f"vocabulary ({c['vocab_size']:,}), untied; {syn['parameters'] / 1e9:.2f}B parameters, "
                  f"{_gib(syn['checkpoint_bytes'])} GiB in {syn['shards']} shards.", ""]
    lines += ["## Targets", "", "| target | measured | result |", "|---|---|---|"]
    sp = t["streamed_peak"]
    note = "" if sp.get("size") in (None, TARGET_SIZE) else f" (at size {sp['size']}; the target is for {TARGET_SIZE})"
    per = ", ".join(f"{m} {100 * v:.0f}%" for m, v in sp["per_method"].items())
    inm = ", ".join(f"{m} {100 * v:.0f}%" for m, v in sp["in_memory_per_method"].items())
    lines.append(f"| {sp['target']} | streamed {per or '-'}; in memory {inm or '-'}{note} | {_met(sp['met'])} |")
    io = t["identical_output"]
    per = ", ".join(f"{m} {'identical' if v else 'differs'}" for m, v in io["per_method"].items())
    lines.append(f"| {io['target']} | {per or '-'} | {_met(io['met'])} |")
    wt = t["wall_time"]
    note = "" if wt.get("size") in (None, TARGET_SIZE) else f" (at size {wt['size']}; the target is for {TARGET_SIZE})"
    per = ", ".join(f"{m} {v:.2f}x" for m, v in wt["per_method"].items())
    lines.append(f"| {wt['target']} | {per or '-'}{note} | {_met(wt['met'])} |")
    lines += ["", "## Runs", "",
              "| model | method | path | checkpoint (GiB) | peak RSS (GiB) | peak / checkpoint | planner peak (GiB) "
              "| wall (s) | streamed / in-memory wall | output identical |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for key, section in data["models"].items():
        pairs = {p["method"]: p for p in section["pairs"]}
        for r in section["runs"]:
            p = pairs.get(r["method"], {})
            last = r["path"] == "streamed"
            ratio = f"{p['wall_ratio']:.2f}x" if last and "wall_ratio" in p else ""
            same = ("yes" if p["identical"] else f"**no** ({p['differing']} tensors differ)") \
                if last and "identical" in p else ""
            if r["returncode"] != 0:
                lines.append(f"| {section['name']} | {r['method']} | {r['path']} | {_gib(r['checkpoint_bytes'])} | "
                             f"failed (exit status {r['returncode']}) | | | | | |")
                continue
            lines.append(f"| {section['name']} | {r['method']} | {r['path']} | {_gib(r['checkpoint_bytes'])} | "
                         f"{_gib(r['peak_rss_bytes'])} | {100 * r['peak_over_checkpoint']:.0f}% | "
                         f"{_gib(r['planner_peak_bytes'])} | {r['wall_s']:.0f} | {ratio} | {same} |")
    lines += ["", f"Every peak includes the process's floor: a child that only imports torch, transformers and "
              f"llmquant peaks at {_gib(meta['baseline_rss_bytes'])} GiB. Planner peak: `estimate_peaks` for the same "
              "config and calibration (the in-memory or streamed figure, by path).", "",
              f"## Planner: Llama-3.1 with GPTQ on {PLANNER_SAMPLES} x {PLANNER_SEQ_LEN} calibration tokens", "",
              "| model | checkpoint (GiB) | in-memory peak (GiB) | streamed peak (GiB) | streamed / checkpoint |",
              "|---|---:|---:|---:|---:|"]
    for p in data["planner"]:
        lines.append(f"| {p['model']} | {_gib(p['checkpoint_bytes'])} | {_gib(p['in_memory_bytes'])} | "
                     f"{_gib(p['streamed_bytes'])} | {100 * p['streamed_over_checkpoint']:.1f}% |")
    lines += ["", "Each from its config.json values (bf16, untied embeddings, vocabulary 128,256), "
              "`llmquant.quant.pipeline.memory_plan.estimate_peaks(config, samples, seq_len, gptq=True)`.", "",
              f"Machine: {meta['cpu']}, {meta['cpus']} CPUs; torch {meta['torch']}, transformers "
              f"{meta['transformers']}. Wall times need a quiet machine: the 1-minute load average before each "
              "run is in the JSON (load_average_before); a busy machine slows one run and not the other."]
    for key, section in data["models"].items():
        commit = section["commit"][:12] + (" with uncommitted changes" if section["commit"].endswith("-dirty") else "")
        loads = [r["load_average_before"] for r in section["runs"] if "load_average_before" in r]
        load = f" (load average before the runs {min(loads):.1f} to {max(loads):.1f})" if loads else ""
        lines.append(f"{section['name']}: measured {section['date']} at llmquant {commit} by "
                     f"`{section['command']}`{load}.")
    lines.append("")
    (RESULTS / "out_of_core.md").write_text("\n".join(lines))


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        # The results files themselves change between runs (a run that skips a model keeps its
        # section): they do not make the measured code uncommitted.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="3b",
                        help="synthetic model preset: " + "; ".join(
                            f"{k}: hidden {v['hidden']}, intermediate {v['intermediate']}, {v['layers']} layers"
                            for k, v in SIZES.items()) + " (default 3b)")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's decoder layers")
    parser.add_argument("--hidden", type=int, default=None,
                        help="override the preset's hidden size (heads follow, at the preset's head size)")
    parser.add_argument("--intermediate", type=int, default=None, help="override the preset's MLP width")
    parser.add_argument("--shard-mb", type=int, default=None,
                        help="shard size of the synthetic checkpoint in MB (default: 2000 for 3b, 500 for 0.5b, "
                             "16 for tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights (default 0)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="quantization methods (default: rtn gptq)")
    parser.add_argument("--skip-synthetic", action="store_true", help="do not measure the synthetic model")
    parser.add_argument("--skip-demo", action="store_true", help="do not measure the demo model")
    parser.add_argument("--keep", action="store_true", help="keep the quantized output folders (and the work folder)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for the quantized outputs and the runs' logs (default: a temporary folder, "
                             "removed at the end unless --keep or a run failed)")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "llmquant-out-of-core",
                        help="where the synthetic checkpoint is written and reused (default: %(default)s)")
    args = parser.parse_args()
    if args.skip_synthetic and args.skip_demo:
        parser.error("--skip-synthetic and --skip-demo leave nothing to measure")
    shape = synthetic_shape(args, GROUP_SIZE)

    import transformers

    from llmquant.loading.demo import ensure_demo_model

    # The planner first: cheap, and an interface problem shows before hours of runs.
    planner = [planner_row(name, config, PLANNER_SAMPLES, PLANNER_SEQ_LEN, True)
               for name, config in LARGE_MODELS.items()]
    for p in planner:
        print(f"planner, {p['model']}, GPTQ {PLANNER_SAMPLES} x {PLANNER_SEQ_LEN}: checkpoint "
              f"{_gib(p['checkpoint_bytes'])} GiB, in memory {_gib(p['in_memory_bytes'])} GiB, streamed "
              f"{_gib(p['streamed_bytes'])} GiB ({100 * p['streamed_over_checkpoint']:.1f}%)\n  {p['describe']}",
              flush=True)

    demo_dir = ensure_demo_model()
    command = "python " + shlex.join(sys.argv)
    date, commit = time.strftime("%Y-%m-%d"), git_commit()
    meta = {"cpu": cpu_description(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "llmquant_commit": commit, "date": date, "command": command,
            "scheme": SCHEME, "group_size": GROUP_SIZE, "demo_group_size": DEMO_GROUP_SIZE,
            "calibration": {"dataset": "builtin", "num_samples": CAL_SAMPLES, "seq_len": CAL_SEQ_LEN, "seed": 0},
            "targets_size": TARGET_SIZE}
    previous = {}
    if (RESULTS / "out_of_core.json").is_file():
        previous = json.loads((RESULTS / "out_of_core.json").read_text()).get("models", {})

    own_work = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="llmquant-out-of-core-")) if own_work else args.workdir.expanduser().absolute()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    args.cache_dir = args.cache_dir.expanduser().absolute()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    sections, failed, completed = {}, False, False
    try:
        meta["baseline_rss_bytes"] = baseline_rss(work)
        print(f"baseline: a child that only imports torch, transformers and llmquant peaks at "
              f"{_gib(meta['baseline_rss_bytes'])} GiB", flush=True)
        todo = []
        if not args.skip_synthetic:
            folder, info = ensure_synthetic(shape, demo_dir, args.cache_dir, args.seed)
            todo.append(("synthetic", f"synthetic {args.size}", folder,
                         json.loads((folder / "config.json").read_text()),
                         {"size": args.size, "shape": shape, "config": info["config"], "shards": info["shards"],
                          "parameters": info["settings"]["parameters"], "source": str(folder)}))
        if not args.skip_demo:
            todo.append(("demo", "demo SmolLM2-135M", demo_dir, json.loads((demo_dir / "config.json").read_text()),
                         {"source": str(demo_dir)}))
        for key, name, src, config, extra in todo:
            label = "synthetic" if key == "synthetic" else "demo"
            group_size = GROUP_SIZE if key == "synthetic" else DEMO_GROUP_SIZE
            result = measure_model(label, src, config, args.methods, work, args.keep, group_size)
            failed |= result.pop("failed")
            sections[key] = {"name": name, **extra, "group_size": group_size, **result, "date": date,
                             "commit": commit, "command": command}
        for key, section in previous.items():  # a model this run skipped keeps its earlier results
            sections.setdefault(key, section)
        data = {"meta": meta, "models": {k: sections[k] for k in ("synthetic", "demo") if k in sections},
                "planner": planner}
        data["targets"] = targets(data["models"])
        write_results(data)
        for t in data["targets"].values():
            print(f"target: {t['target']}: {_met(t['met']).strip('*')}", flush=True)
        print(f"wrote {RESULTS / 'out_of_core.json'} and {RESULTS / 'out_of_core.md'}", flush=True)
        completed = True
    finally:
        if own_work and not args.keep and completed and not failed:
            shutil.rmtree(work, ignore_errors=True)
        elif not completed or failed:
            print(f"logs kept in {work / 'logs'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
