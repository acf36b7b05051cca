"""Our GGUF files against llama.cpp's own quantizer, measured by llama.cpp on the demo model.

Every file is scored by llama.cpp itself (llama-cpp-python, in its own environment) on the same
held-out windows: the first --eval-tokens tokens of the built-in corpus's evaluation split (the
tokens `llmquant eval perplexity` scores), cut into non-overlapping --window-token windows with
llmquant's window plan, fed to llama.cpp as token ids (same vocabulary, no re-tokenization, no
BOS), NLL of every scored token from llama.cpp's logits.

Files, all made from the demo model's bf16 safetensors:
- float reference: llama.cpp's converter (convert_hf_to_gguf.py, --outtype f32); every other
  row's "increase" is over this file's perplexity in llama.cpp;
- llama.cpp's own Q4_0, Q4_K_M, Q8_0: `llama-quantize` of that F32 file, without and with an
  importance matrix from `llama-imatrix` on the calibration text GPTQ uses (the same windows of
  the built-in corpus's calibration split: llmquant's calibration_batches, seed 0, written out
  as text; the imatrix reads it in --seq-len-token chunks);
- ours: `llmquant export DEMO --format gguf --type T --method gptq` with the same number of
  calibration samples and tokens (Q4_1 is left out: the demo weights came from a Q4_1 file).
Plus, per type, batch-1 decode speed of our file and theirs (with imatrix) in llama-cpp-python,
2 threads, runs alternated, medians. The tensor types each file really holds are read back with
the gguf reader (llama.cpp falls back to other types for rows not a multiple of 256).

    bash benchmarks/setup_llamacpp.sh          # once: llama-cpp-python, llama-quantize, llama-imatrix
    python benchmarks/gguf_quality.py          # full run (a quiet machine, please)
    python benchmarks/gguf_quality.py --quick  # end-to-end check: fewer tokens, fewer repeats

Writes benchmarks/results/gguf_quality.json and gguf_quality.md (--quick writes
gguf_quality_quick.* instead, so a check never overwrites the measured results).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from speed import LLAMACPP_CHILD, cpu_description  # noqa: E402

LLAMACPP_PYTHON = "/tmp/llamacpp-venv/bin/python"
TYPES = ("Q4_0", "Q4_K_M", "Q8_0")
THREADS = 2
EXTRA_WINDOWS = 2  # calibration windows after GPTQ's in the imatrix text (see write_calibration_text)
MIB = 1024 * 1024

# ---- llama.cpp's side: converter, imatrix, quantize (paths laid out by setup_llamacpp.sh) ------


def tools_from(python: str, bin_dir: str | None, converter: str | None) -> dict:
    """llama-quantize, llama-imatrix and convert_hf_to_gguf.py of llama.cpp's environment."""
    venv = Path(python).parent.parent
    bins = Path(bin_dir) if bin_dir else venv / "bin"
    conv = Path(converter) if converter else venv / "llama.cpp" / "convert_hf_to_gguf.py"
    tools = {"quantize": bins / "llama-quantize", "imatrix": bins / "llama-imatrix", "converter": conv,
             "gguf_py": conv.parent / "gguf-py", "convert_deps": conv.parent / "convert-deps"}
    missing = [str(p) for k, p in tools.items() if k != "convert_deps" and not p.exists()]
    if missing:
        raise SystemExit("error: llama.cpp tools not found: " + ", ".join(missing)
                         + "\nrun 'bash benchmarks/setup_llamacpp.sh' (or pass --llamacpp-bin / --converter)")
    return tools


def run(cmd: list, log: Path, env: dict | None = None) -> float:
    """Run a tool niced, its output to `log`; its wall time. Fails with the log's tail."""
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(["nice", "-n", "10", *map(str, cmd)], stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(map(str, cmd))} failed ({proc.returncode}):\n"
                           + log.read_text(errors="replace")[-3000:])
    return time.perf_counter() - t


def convert_float(tools: dict, demo: Path, out: Path, work: Path, outtype: str) -> float:
    """llama.cpp's converter, run by this (torch-bearing) python with the vendored gguf-py."""
    path = [str(tools["gguf_py"])] + ([str(tools["convert_deps"])] if tools["convert_deps"].is_dir() else [])
    return run([sys.executable, tools["converter"], demo, "--outtype", outtype, "--outfile", out],
               work / "convert.log", env={"PYTHONPATH": os.pathsep.join(path), "NO_LOCAL_GGUF": "1"})


def write_calibration_text(tokenizer, path: Path, num_samples: int, seq_len: int) -> dict:
    """The windows GPTQ calibrates on (llmquant's calibration_batches, seed 0) as one text file.

    llama.cpp's tokenizer makes about 0.5% fewer tokens of this text than the model's own (it
    splits differently), so EXTRA_WINDOWS more windows of the calibration split follow: with
    --chunks num_samples, llama-imatrix reads num_samples x seq_len of its tokens, GPTQ's text
    first. The next windows of the same seed's draw (the draw's first windows do not depend on
    how many are drawn), so never evaluation text.
    """
    from llmquant.data import calibration_batches

    windows = calibration_batches(tokenizer, "builtin", num_samples=num_samples + EXTRA_WINDOWS, seq_len=seq_len,
                                  seed=0)
    gptq = calibration_batches(tokenizer, "builtin", num_samples=num_samples, seq_len=seq_len, seed=0)
    assert (windows[:num_samples] == gptq).all(), "calibration draw changed with num_samples"
    text = "".join(tokenizer.decode(w.tolist()) for w in gptq)
    padding = "".join(tokenizer.decode(w.tolist()) for w in windows[num_samples:])
    path.write_text(text + padding, encoding="utf-8")
    return {"windows": num_samples, "seq_len": seq_len, "tokens": num_samples * seq_len, "characters": len(text),
            "padding_windows": EXTRA_WINDOWS, "padding_characters": len(padding)}


def imatrix_run(tools: dict, f32: Path, calib: Path, out: Path, work: Path, seq_len: int, num_chunks: int) -> dict:
    """llama-imatrix over num_chunks chunks of seq_len tokens (one sequence per batch: -b seq_len)."""
    seconds = run([tools["imatrix"], "-m", f32, "-f", calib, "-o", out, "-c", seq_len, "-b", seq_len,
                   "--chunks", num_chunks, "-t", THREADS, "--no-ppl"], work / "imatrix.log")
    log = (work / "imatrix.log").read_text(errors="replace")
    m = re.search(r"computing over (\d+) chunks, n_ctx=(\d+)", log)
    chunks = int(m.group(1)) if m else None
    if chunks != num_chunks:
        print(f"warning: llama-imatrix read {chunks} chunks, not {num_chunks}", file=sys.stderr)
    return {"seconds": seconds, "chunks": chunks, "chunk_tokens": int(m.group(2)) if m else None}


def llama_quantize(tools: dict, f32: Path, out: Path, qtype: str, imatrix: Path | None, work: Path) -> dict:
    """Quantize; its time, and what its log says about the imatrix and type fallbacks."""
    log = work / f"quantize-{out.stem}.log"
    cmd = [tools["quantize"]] + (["--imatrix", imatrix] if imatrix else []) + [f32, out, qtype, THREADS]
    seconds = run(cmd, log)
    text = log.read_text(errors="replace")
    chunks = re.search(r"computed on (\d+) chunks", text)
    fallback = re.search(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback", text)
    return {"make_seconds": seconds, "imatrix_chunks_in_file": int(chunks.group(1)) if chunks else None,
            "fallback_tensors": int(fallback.group(1)) if fallback else 0}


# ---- ours -------------------------------------------------------------------------------------


def export_help() -> str | None:
    """`llmquant export --help`, or None while the command does not exist."""
    proc = subprocess.run([sys.executable, "-m", "llmquant", "export", "--help"], capture_output=True, text=True,
                          cwd=REPO)
    return proc.stdout if proc.returncode == 0 and "--format" in proc.stdout else None


def export_ours(demo: Path, out: Path, qtype: str, num_samples: int, seq_len: int, help_text: str,
                work: Path) -> tuple[float, list[str]]:
    cmd = [sys.executable, "-m", "llmquant", "export", str(demo), "--format", "gguf", "--type", qtype,
           "--method", "gptq", "--output", str(out)]
    # The calibration GPTQ draws, spelled out (the built-in corpus, seed 0: the imatrix text's windows);
    # no verification run: this script measures every file in llama.cpp itself.
    for flag, value in (("--dataset", "builtin"), ("--num-samples", num_samples), ("--seq-len", seq_len),
                        ("--seed", 0), ("--no-verify", None), ("--overwrite", None), ("--quiet", None)):
        if flag in help_text:
            cmd += [flag] + ([str(value)] if value is not None else [])
    seconds = run(cmd, work / f"export-{out.stem}.log")
    return seconds, ["python" if c == sys.executable else c for c in cmd]


# ---- measuring a file -------------------------------------------------------------------------

PPL_CHILD = r"""
import json, sys
import numpy as np
import llama_cpp
path, ids, windows, threads = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
n_ctx = max(end - begin for begin, end, _ in windows)
llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512), logits_all=True,
                      n_threads=threads, n_threads_batch=threads, verbose=False)
assert llm.n_vocab() == int(sys.argv[5]), (llm.n_vocab(), sys.argv[5])
nll, count, per_window = 0.0, 0, []
for begin, end, first in windows:
    llm.reset()
    llm.eval(ids[begin:end])
    w = 0.0
    for a in range(first, end, 256):  # row t of llm.scores (T, V) predicts token t+1; 256 rows at a time
        b = min(a + 256, end)
        rows = np.asarray(llm.scores[a - begin - 1 : b - begin - 1], dtype=np.float64)
        top = rows.max(axis=1)
        lse = np.log(np.exp(rows - top[:, None]).sum(axis=1)) + top
        w += float((lse - rows[np.arange(b - a), ids[a:b]]).sum())
    nll += w; count += end - first; per_window.append(w / (end - first))
print(json.dumps({"nll": nll, "tokens": count, "per_window": per_window, "version": llama_cpp.__version__}))
"""


def llamacpp_perplexity(python: str, gguf: Path, ids: list[int], windows, vocab: int) -> dict:
    plan = [[w.begin, w.end, w.first_scored] for w in windows]
    t = time.perf_counter()
    proc = subprocess.run(["nice", "-n", "10", python, "-c", PPL_CHILD, str(gguf), json.dumps(ids), json.dumps(plan),
                           str(THREADS), str(vocab)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp perplexity of {gguf.name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    import math

    out["perplexity"] = math.exp(out["nll"] / out["tokens"])
    out["seconds"] = time.perf_counter() - t
    return out


def llamacpp_speed(python: str, gguf: Path, ids: list[int], decode_tokens: int) -> tuple[float, float]:
    """(decode tokens/s, 512-token prefill tokens/s), batch 1, through speed.py's child."""
    proc = subprocess.run([python, "-c", LLAMACPP_CHILD, str(gguf), json.dumps(ids), str(decode_tokens), "32", "512",
                           str(THREADS)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp speed run of {gguf.name} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["decode"], out["prefill"]


def tensor_kind(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'attn_q'; 'token_embd.weight' -> 'token_embd'."""
    return re.sub(r"^blk\.\d+\.", "", name).removesuffix(".weight").removesuffix(".bias")


def file_contents(gguf: Path) -> dict:
    """Size, bits per weight and the tensor types per kind, read back with the gguf reader."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    kinds: dict[str, dict[str, int]] = {}
    matrix_bytes = matrix_elems = linear_bytes = linear_elems = all_elems = 0
    for t in reader.tensors:
        elems, nbytes, type_name = int(t.n_elements), int(t.n_bytes), t.tensor_type.name
        all_elems += elems
        if len(t.shape) >= 2:  # every matrix: the decoder's Linear weights and the embedding
            kind = tensor_kind(t.name)
            kinds.setdefault(kind, {})
            kinds[kind][type_name] = kinds[kind].get(type_name, 0) + 1
            matrix_bytes += nbytes
            matrix_elems += elems
            if t.name.startswith("blk."):
                linear_bytes += nbytes
                linear_elems += elems
    size = gguf.stat().st_size
    return {"bytes": size, "mib": size / MIB, "parameters": all_elems,
            "bpw_matrices": 8 * matrix_bytes / matrix_elems, "bpw_decoder_linears": 8 * linear_bytes / linear_elems,
            "bpw_file": 8 * size / all_elems, "tensor_types": kinds}


# ---- the run ----------------------------------------------------------------------------------


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, each with the numbers it compares and whether it is met."""
    by = {(r["source"], r["type"], r["imatrix"] or r["source"] == "llmquant"): r for r in rows}
    out = []

    def add(name, ours, theirs, passed, detail):
        out.append({"target": name, "ours": ours, "theirs": theirs, "met": passed, "detail": detail})

    o, t = by.get(("llmquant", "Q4_0", True)), by.get(("llama.cpp", "Q4_0", True))
    if o and t:
        add("Q4_0: our increase <= 0.8 x llama.cpp Q4_0+imatrix's", o["increase"], t["increase"],
            o["increase"] <= 0.8 * t["increase"], f"{o['increase']:+.4f} vs 0.8 x {t['increase']:+.4f} = "
            f"{0.8 * t['increase']:+.4f} (ratio {o['increase'] / t['increase']:.3f})")
    o, t = by.get(("llmquant", "Q4_K_M", True)), by.get(("llama.cpp", "Q4_K_M", True))
    if o and t:
        add("Q4_K_M: our perplexity <= llama.cpp Q4_K_M+imatrix's at equal or smaller size", o["perplexity"],
            t["perplexity"], o["perplexity"] <= t["perplexity"] and o["bytes"] <= t["bytes"],
            f"{o['perplexity']:.4f} vs {t['perplexity']:.4f}; {o['bytes']:,} vs {t['bytes']:,} bytes")
    o, t = by.get(("llmquant", "Q8_0", True)), by.get(("llama.cpp", "Q8_0", True))
    if o and t:
        rel = o["perplexity"] / t["perplexity"] - 1
        # "Within 0.1%" bounds how much worse ours may be; a lower perplexity than theirs meets it too.
        add("Q8_0: our perplexity at most 0.1% above llama.cpp Q8_0+imatrix's", o["perplexity"], t["perplexity"],
            rel <= 0.001, f"{o['perplexity']:.4f} vs {t['perplexity']:.4f} ({100 * rel:+.3f}%)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="end-to-end check: 2,048 eval tokens in 512-token windows, 16 x 512 calibration "
                             "tokens, 1 speed run of 32 tokens; writes gguf_quality_quick.*")
    parser.add_argument("--types", nargs="*", default=list(TYPES), choices=list(TYPES))
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--num-samples", type=int, default=128, help="calibration windows (GPTQ and imatrix)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    parser.add_argument("--speed-repeats", type=int, default=5, help="alternating decode runs per file; 0: none")
    parser.add_argument("--float-type", default="f32", choices=["f32", "bf16"], help="the reference GGUF")
    parser.add_argument("--ours", choices=["auto", "on", "off"], default="auto",
                        help="our files: auto (when `llmquant export` exists), on (required), off")
    parser.add_argument("--llamacpp-python", default=LLAMACPP_PYTHON, help="python of llama.cpp's environment")
    parser.add_argument("--llamacpp-bin", default=None,
                        help="folder with llama-quantize and llama-imatrix (default: that environment's bin)")
    parser.add_argument("--converter", default=None,
                        help="llama.cpp's convert_hf_to_gguf.py (default: <environment>/llama.cpp/)")
    parser.add_argument("--work", default=None,
                        help="keep every file and log in this folder (default: a temporary one, removed)")
    args = parser.parse_args()
    decode_tokens = 128
    if args.quick:
        args.eval_tokens, args.window, args.num_samples, args.seq_len = 2048, 512, 16, 512
        args.speed_repeats, decode_tokens = min(args.speed_repeats, 1), 32

    import llmquant
    from transformers import AutoTokenizer

    from llmquant.data import evaluation_tokens
    from llmquant.eval import perplexity
    from llmquant.eval.windows import plan_windows
    from llmquant.loading.demo import ensure_demo_model

    tools = tools_from(args.llamacpp_python, args.llamacpp_bin, args.converter)
    help_text = export_help() if args.ours != "off" else None
    if args.ours == "on" and help_text is None:
        raise SystemExit("error: `llmquant export --format gguf` is not available in this checkout")
    demo = ensure_demo_model()
    tokenizer = AutoTokenizer.from_pretrained(demo)
    ids = evaluation_tokens(tokenizer, max_tokens=args.eval_tokens).tolist()
    windows = plan_windows(len(ids), args.window, args.window)
    scored = sum(w.num_scored for w in windows)
    vocab = len(tokenizer)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="llmquant-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    steps: dict = {}
    try:
        # The same windows through llmquant's own evaluation (float32): checks the windows and
        # llama.cpp's float file against the reference implementation.
        t = time.perf_counter()
        ours_float = perplexity(str(demo), max_tokens=args.eval_tokens, window=args.window, dtype="float32",
                                progress=False)
        steps["llmquant_float32_perplexity"] = {"perplexity": ours_float.perplexity,
                                               "seconds": time.perf_counter() - t}
        print(f"llmquant float32: perplexity {ours_float.perplexity:.4f} on {scored:,} scored tokens", flush=True)

        reference = work / f"theirs-{args.float_type}.gguf"
        steps["convert_seconds"] = convert_float(tools, demo, reference, work, args.float_type)
        calib = work / "calibration.txt"
        steps["calibration"] = write_calibration_text(tokenizer, calib, args.num_samples, args.seq_len)
        imatrix = work / "imatrix.gguf"
        steps["imatrix"] = imatrix_run(tools, reference, calib, imatrix, work, args.seq_len, args.num_samples)
        print(f"imatrix: {steps['imatrix']}", flush=True)

        files: list[tuple[dict, Path]] = [(dict(source="llama.cpp", type=args.float_type.upper(), imatrix=False,
                                                 made_by=f"convert_hf_to_gguf.py --outtype {args.float_type}",
                                                 make_seconds=steps["convert_seconds"]), reference)]
        for qtype in args.types:
            for use_imatrix in (False, True):
                out = work / f"theirs-{qtype}{'-imatrix' if use_imatrix else ''}.gguf"
                made = llama_quantize(tools, reference, out, qtype, imatrix if use_imatrix else None, work)
                files.append((dict(source="llama.cpp", type=qtype, imatrix=use_imatrix, **made,
                                   made_by="llama-quantize" + (" --imatrix" if use_imatrix else "")), out))
            if help_text is not None:
                out = work / f"ours-{qtype}.gguf"
                seconds, cmd = export_ours(demo, out, qtype, args.num_samples, args.seq_len, help_text, work)
                # No imatrix: GPTQ calibrates on the same windows (its Hessians weigh the columns).
                files.append((dict(source="llmquant", type=qtype, imatrix=False, gptq=True, make_seconds=seconds,
                                   made_by=shlex.join(cmd).replace(str(demo), "DEMO").replace(str(work) + "/", "")),
                              out))
            print(f"{qtype}: files made", flush=True)

        import gguf
        import torch
        import transformers

        meta = {"machine": cpu_description(), "threads": THREADS, "llama_cpp_python": None,
                "gguf_py": getattr(gguf, "__version__", None), "torch": torch.__version__,
                "transformers": transformers.__version__, "llmquant": llmquant.__version__, "commit": git_commit(),
                "eval": {"tokens": len(ids), "scored_tokens": scored, "window": args.window, "stride": args.window,
                         "windows": len(windows), "bos": False,
                         "source": "built-in corpus, held-out evaluation split (first tokens)",
                         "llmquant_method": ours_float.method},
                "calibration": {**steps["calibration"], "source": "built-in corpus, calibration split, "
                                "llmquant calibration_batches seed 0"},
                "imatrix": steps["imatrix"], "float_reference": args.float_type,
                "llmquant_float32_perplexity": steps["llmquant_float32_perplexity"]["perplexity"],
                "bpw": {"bpw_matrices": "bytes x 8 / elements of every tensor with 2 or more dimensions "
                        "(decoder Linear weights and token_embd, the tied output head); 1-D norms excluded",
                        "bpw_decoder_linears": "the same over the blk.* matrices only",
                        "bpw_file": "file size x 8 / all parameters"},
                "ours_measured": help_text is not None, "quick": args.quick, "decode_tokens": decode_tokens,
                "speed_repeats": args.speed_repeats, "command": "python " + shlex.join(sys.argv),
                "date": time.strftime("%Y-%m-%d")}
        stem = "gguf_quality_quick" if args.quick else "gguf_quality"
        for info, path in files:
            ppl = llamacpp_perplexity(args.llamacpp_python, path, ids, windows, vocab)
            meta["llama_cpp_python"] = ppl["version"]
            row = {**info, "file": path.name, **file_contents(path), "perplexity": ppl["perplexity"],
                   "nll_per_token": ppl["nll"] / ppl["tokens"], "scored_tokens": ppl["tokens"],
                   "eval_seconds": ppl["seconds"]}
            row["increase"] = row["perplexity"] - (rows[0]["perplexity"] if rows else row["perplexity"])
            row["increase_pct"] = 100 * (row["increase"] / (rows[0]["perplexity"] if rows else row["perplexity"]))
            rows.append(row)
            write(rows, [], targets(rows), meta, stem)  # after every file: an interrupted run keeps its rows
            print(f"{row['source']:9s} {row['type']:6s} imatrix={row['imatrix']!s:5s} {row['mib']:7.2f} MiB "
                  f"{row['bpw_matrices']:.3f} bpw  perplexity {row['perplexity']:.4f}", flush=True)

        speed: list[dict] = []
        if args.speed_repeats > 0 and help_text is not None:
            paths = {(i["source"], i["type"], i["imatrix"] or i["source"] == "llmquant"): p for i, p in files}
            for qtype in args.types:
                pair = {"llmquant": paths[("llmquant", qtype, True)], "llama.cpp": paths[("llama.cpp", qtype, True)]}
                for p in pair.values():  # warm-up: page cache
                    llamacpp_speed(args.llamacpp_python, p, ids, 8)
                runs: dict[str, list] = {k: [] for k in pair}
                for _ in range(args.speed_repeats):
                    for who, p in pair.items():
                        runs[who].append(llamacpp_speed(args.llamacpp_python, p, ids, decode_tokens))
                for who, rs in runs.items():
                    speed.append({"type": qtype, "source": who, "file": pair[who].name,
                                  "decode_tok_s": statistics.median(r[0] for r in rs),
                                  "prefill_tok_s": statistics.median(r[1] for r in rs), "runs": rs})
                print(f"{qtype} decode: ours {speed[-2]['decode_tok_s']:.1f}, "
                      f"theirs {speed[-1]['decode_tok_s']:.1f} tok/s", flush=True)
                write(rows, speed, targets(rows), meta, stem)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    write(rows, speed, targets(rows), meta, stem)
    return 0


def type_summary(kinds: dict) -> str:
    """'attn_q,attn_k,...: Q4_K; ffn_down: Q6_K x15, Q4_K x15; token_embd: Q8_0' (same types grouped)."""
    groups: dict[str, list[str]] = {}
    for kind, types in kinds.items():
        key = ", ".join(f"{t}" + (f" x{n}" if len(types) > 1 else "") for t, n in sorted(types.items()))
        groups.setdefault(key, []).append(kind)
    return "; ".join(f"{'/'.join(ks)}: {key}" for key, ks in groups.items())


def write(rows: list[dict], speed: list[dict], goals: list[dict], meta: dict, stem: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "targets": goals,
                                                      "speed": speed}, indent=2) + "\n")
    e, c = meta["eval"], meta["calibration"]
    base = rows[0]
    lines = ["# GGUF files in llama.cpp: ours (GPTQ) vs llama.cpp's quantizer (demo model, SmolLM2-135M-Instruct)"
             + (" — QUICK CHECK, not a measurement" if meta["quick"] else ""), "",
             f"Perplexity measured by llama.cpp (llama-cpp-python {meta['llama_cpp_python']}, {meta['threads']} "
             f"threads) on the first {e['tokens']:,} tokens of the built-in corpus's held-out split, "
             f"{e['windows']} non-overlapping {e['window']}-token windows, {e['scored_tokens']:,} scored tokens, "
             "token ids fed directly (no BOS). The float reference is llama.cpp's converter's "
             f"{meta['float_reference'].upper()} file (perplexity {base['perplexity']:.4f}; llmquant's own float32 "
             f"evaluation of the same windows: {meta['llmquant_float32_perplexity']:.4f}). Calibration for GPTQ and "
             f"for llama-imatrix: the same {c['windows']} x {c['seq_len']} tokens of the calibration split "
             f"(llama-imatrix read {meta['imatrix']['chunks']} chunks of {meta['imatrix']['chunk_tokens']}).", "",
             "| file | type | imatrix | size bytes | MiB | bpw (matrices) | bpw (decoder linears) | perplexity "
             "| increase over float |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        who = "llmquant GPTQ" if r["source"] == "llmquant" else "llama.cpp"
        imx = "—" if r is base else ("GPTQ" if r["source"] == "llmquant" else "yes" if r["imatrix"] else "no")
        lines.append(f"| {who} | {r['type']} | {imx} | {r['bytes']:,} | {r['mib']:.2f} | {r['bpw_matrices']:.3f} | "
                     f"{r['bpw_decoder_linears']:.3f} | {r['perplexity']:.4f} | "
                     + ("—" if r is base else f"{r['increase']:+.4f} ({r['increase_pct']:+.2f}%)") + " |")
    lines += ["", "bpw (matrices): bytes x 8 / elements of every 2-D tensor (the 210 decoder Linear weights and "
              "token_embd, which is also the output head: tied embeddings); norms (1-D, F32) excluded. "
              "bpw (decoder linears): the same over the blk.* matrices only.", ""]
    ours = next((r for r in rows if r["source"] == "llmquant"), None)
    if ours:
        cmd = ours["made_by"].replace(f"--type {ours['type']}", "--type T").replace(f"-{ours['type']}.gguf", "-T.gguf")
        lines += [f"Our files: `{cmd}` (T: each type; GPTQ, no imatrix).", ""]
    if goals:
        lines += ["## Targets", "", "| target | met | numbers |", "|---|---|---|"]
        lines += [f"| {g['target']} | {'yes' if g['met'] else '**no**'} | {g['detail']} |" for g in goals]
        lines.append("")
    elif not meta["ours_measured"]:
        lines += ["Our files were not measured (`llmquant export --format gguf` not available).", ""]
    if speed:
        lines += ["## Decode speed (llama-cpp-python, batch 1)", "",
                  f"{meta['decode_tokens']} tokens after a 32-token prompt (first excluded), "
                  f"{meta['threads']} threads, "
                  f"median of {meta['speed_repeats']} runs alternated between the two files of a type; llama.cpp's "
                  "file is its imatrix one.", "",
                  "| type | file | decode tok/s | vs llama.cpp | prefill 512 tok/s |", "|---|---|---:|---:|---:|"]
        theirs = {s["type"]: s["decode_tok_s"] for s in speed if s["source"] == "llama.cpp"}
        for s in speed:
            lines.append(f"| {s['type']} | {s['source']} | {s['decode_tok_s']:.1f} | "
                         f"{s['decode_tok_s'] / theirs[s['type']]:.2f}x | {s['prefill_tok_s']:.0f} |")
        lines.append("")
    lines += ["## Tensor types each file holds (read back with the gguf reader)", ""]
    lines += [f"- {r['source']} {r['type']}{' +imatrix' if r['imatrix'] and r['source'] == 'llama.cpp' else ''}: "
              f"{type_summary(r['tensor_types'])}" for r in rows]
    lines += ["", f"Machine: {meta['machine']}. Commit {meta['commit']}. Command: `{meta['command']}` "
              f"({meta['date']}).", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
