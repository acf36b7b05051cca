"""Does quantization cost a MoE what it costs the dense model? Measured on real weights.

The MoE is built from the demo model (SmolLM2-135M-Instruct) by *sparse upcycling*, not a
pretrained MoE: a MixtralForCausalLM whose attention, norms and embeddings are the demo model's,
whose every MLP is copied into E experts (default 4, top-2), and whose routers get small seeded
random weights, with the mean direction of their input (measured on calibration text) projected
out so that tokens really spread across experts (benchmarks/moe_upcycle.py says why). Mixtral
renormalizes the top-k routing weights to sum to 1 and every expert is the original MLP, so the
upcycled model computes the dense model's function: the script first measures both perplexities
and stops (exit status 1) if they differ by more than 0.05%, or if some expert of some layer
gets less than a quarter of its fair share of the routed tokens.

Then, for each scheme, it quantizes the dense model and the upcycled MoE with `llmquant.quantize`
(same recipe, same calibration windows; in a child process, as benchmarks/quality.py does),
reloads each checkpoint through llmquant's runtime and measures its perplexity on the same
held-out tokens. Since both start from the same function, the two perplexity changes should
agree when the experts are quantized like the dense MLPs; the table says whether they agree
within 0.5 points, and what share of the MoE's parameters the quantization report lists as
quantized (experts left in full precision show up there, and make the MoE's change smaller).

    python benchmarks/quality_moe.py                                # every scheme (~1 h on 2 cores)
    python benchmarks/quality_moe.py --schemes FP8_DYNAMIC          # one scheme (re-measured in place)
    python benchmarks/quality_moe.py --upcycle-only --max-tokens 4096   # only build + equality check

Writes benchmarks/results/quality_moe.json and quality_moe.md (rewritten after every scheme;
not with --upcycle-only).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from moe_upcycle import UPCYCLE_JSON, routing_spread, upcycle  # noqa: E402
from quality import CAL, LC_PYTHON, quantize_in_child  # noqa: E402
from speed import cpu_description  # noqa: E402

RESULTS = Path(__file__).parent / "results"
EQUALITY_TOLERANCE_PCT = 0.05  # dense vs upcycled perplexity, before any quantization
AGREEMENT_POINTS = 0.5  # dense vs MoE perplexity change, in percentage points
MIN_SHARE_OF_FAIR = 0.25  # every expert of every layer gets at least a quarter of its fair share
# Every perplexity in float32, as benchmarks/quality.py measures. In bf16 the MoE's weighted sum
# of two expert outputs is rounded differently from the dense MLP's output: on 4,096 tokens that
# alone moved perplexity by -0.055%, beyond the equality check's tolerance.
DTYPE = "float32"
LAYOUT_VERSION = 1  # raise when moe_upcycle.py changes what it builds: older folders are rebuilt
CENTERING_SAMPLES = 8  # calibration windows (x 512 tokens) for the routers' mean input

# (scheme name, quantize() keyword arguments): the same for the dense model and the MoE.
SCHEMES: list[tuple[str, dict]] = [
    ("W4A16 g64 sym RTN", dict(scheme="W4A16", group_size=64, observer="minmax")),
    # Each expert's Hessian from the tokens routed to it (the default). Each token then goes through
    # two experts rounded differently (their Hessians differ), and the routing-weighted sum of two
    # independently rounded copies averages part of the rounding error away.
    ("W4A16 g64 sym GPTQ", dict(scheme="W4A16", group_size=64, gptq=True, **CAL)),
    # Every expert on every calibration token: each expert's Hessian is the dense MLP's, so its
    # GPTQ result must be the dense layer's: the check that expert quantization matches dense.
    ("W4A16 g64 sym GPTQ, every expert on every token", dict(scheme="W4A16", group_size=64, gptq=True,
                                                            moe_calibration="all", **CAL)),
    ("FP8_DYNAMIC", dict(scheme="FP8_DYNAMIC", **CAL)),  # SmoothQuant auto, as the scheme's default
]


def build_moe(demo_dir: Path, moe_dir: Path, args) -> dict:
    """The upcycled model in `moe_dir`: reused when an earlier run built it with the same settings."""
    from llmquant.data import calibration_batches
    from transformers import AutoTokenizer

    # The routers' mean input is measured on the calibration split, never on the evaluated tokens.
    center_on = calibration_batches(AutoTokenizer.from_pretrained(demo_dir), "builtin",
                                    num_samples=CENTERING_SAMPLES, seq_len=512, seed=args.seed)
    wanted = {"num_experts": args.experts, "top_k": args.top_k, "source": str(demo_dir),
              "router_settings": [args.router_std, args.seed, CENTERING_SAMPLES], "layout_version": LAYOUT_VERSION}
    marker = moe_dir / UPCYCLE_JSON
    if marker.is_file():
        info = json.loads(marker.read_text())
        if all(info.get(k) == v for k, v in wanted.items()):
            print(f"reusing the upcycled model in {moe_dir}", flush=True)
            return info
        shutil.rmtree(moe_dir)
    elif moe_dir.exists() and any(moe_dir.iterdir()):
        raise SystemExit(f"{moe_dir} exists and was not written by this script; choose another --moe-dir.")
    t = time.perf_counter()
    info = upcycle(demo_dir, moe_dir, num_experts=args.experts, top_k=args.top_k, seed=args.seed,
                   router_std=args.router_std, center_on=center_on)
    info.update(router_settings=wanted["router_settings"], layout_version=LAYOUT_VERSION)
    (moe_dir / UPCYCLE_JSON).write_text(json.dumps(info, indent=2) + "\n")
    print(f"upcycled {demo_dir.name} into {args.experts} experts (top-{args.top_k}) in {moe_dir} "
          f"({time.perf_counter() - t:.0f} s, {info['parameters'] / 1e6:.0f}M parameters)", flush=True)
    return info


def check_equal_function(demo_dir: Path, moe_dir: Path, args) -> dict:
    """Perplexity of the dense and the upcycled model on the same tokens; exits if they differ."""
    from llmquant.eval import perplexity
    from llmquant import load_model
    from llmquant.data import evaluation_tokens

    dense = load_model(demo_dir, dtype=DTYPE)
    d = perplexity(dense, max_tokens=args.max_tokens, progress=False)
    ids = evaluation_tokens(dense.tokenizer, max_tokens=1024)[None, :]  # (1, 1024)
    with torch.no_grad():
        dense_logits = dense.model(input_ids=ids).logits.float()
    del dense
    moe = load_model(moe_dir, dtype=DTYPE)
    m = perplexity(moe, max_tokens=args.max_tokens, progress=False)
    with torch.no_grad():
        logit_diff = (moe.model(input_ids=ids).logits.float() - dense_logits).abs().max().item()
    spread = routing_spread(moe.model, ids)
    del moe
    change = 100.0 * (m.perplexity / d.perplexity - 1.0)
    result = {"dense_perplexity": d.perplexity, "moe_perplexity": m.perplexity, "change_pct": change,
              "tolerance_pct": EQUALITY_TOLERANCE_PCT, "tokens_scored": d.num_tokens_scored,
              "max_abs_logit_difference": logit_diff, "routing": spread, "method": d.method,
              "dense_seconds": d.seconds, "moe_seconds": m.seconds}
    print(f"dense perplexity {d.perplexity:.6f} ({d.seconds:.0f} s), upcycled MoE {m.perplexity:.6f} "
          f"({m.seconds:.0f} s): {change:+.5f}% on {d.num_tokens_scored:,} tokens ({DTYPE}); max |logit "
          f"difference| {logit_diff:.2e} on 1,024 tokens", flush=True)
    print(f"routing on {spread['tokens']:,} tokens: share of top-{args.top_k} assignments per expert "
          f"{spread['share_per_expert']}, per layer between {spread['min_share_any_layer']:.3f} and "
          f"{spread['max_share_any_layer']:.3f}", flush=True)
    if m.num_tokens_scored != d.num_tokens_scored or not abs(change) <= EQUALITY_TOLERANCE_PCT:
        raise SystemExit(f"FAILED: the upcycled MoE does not compute the dense model's function: perplexity "
                         f"{m.perplexity:.4f} vs {d.perplexity:.4f} ({change:+.4f}%, tolerance "
                         f"{EQUALITY_TOLERANCE_PCT}%). The upcycling or the MoE forward is wrong; no quantization "
                         "result would mean anything.")
    fair = 1.0 / args.experts
    if spread["min_share_any_layer"] < MIN_SHARE_OF_FAIR * fair:
        raise SystemExit(f"FAILED: tokens do not spread across experts: in some layer an expert gets "
                         f"{100 * spread['min_share_any_layer']:.1f}% of the assignments (fair share "
                         f"{100 * fair:.0f}%, at least {100 * MIN_SHARE_OF_FAIR * fair:.1f}% required); "
                         "try another --seed.")
    return result


def quantized_share(report: dict, non_embedding_params: int) -> dict:
    """What the quantization report says was quantized: its coverage section's share of the
    non-embedding parameters when it has one; otherwise the weights of the layers it lists over
    the same non-embedding parameters. Plus how many of its layers are expert projections."""
    layers = report.get("layers", [])
    weights = sum(r["out_features"] * r["in_features"] for r in layers)
    experts = [r for r in layers if ".experts." in r["name"]]
    coverage = report.get("coverage")
    share = 100.0 * (coverage["quantized_share"] if coverage else weights / non_embedding_params)
    return {"quantized_share_pct": share, "share_source": "report coverage" if coverage else "report layers",
            "quantized_layers": len(layers), "quantized_weights": weights,
            "expert_layers_quantized": len(experts),
            "expert_weights_quantized": sum(r["out_features"] * r["in_features"] for r in experts),
            "kept_full_precision": len(report.get("kept_full_precision", {})),
            "coverage": coverage, "report_summary": report.get("summary", {})}


def measure(kwargs: dict, model_dir: Path, non_embedding_params: int, args) -> dict:
    """Quantize `model_dir` in a child process, reload the checkpoint as served, measure perplexity."""
    from llmquant.eval import perplexity
    from llmquant import load_model

    work = Path(tempfile.mkdtemp(prefix="llmquant-bench-moe-"))
    try:
        out = work / "q"
        child = quantize_in_child(kwargs, model_dir, out, LC_PYTHON)
        report = json.loads((out / "quantization_report.json").read_text())
        served = load_model(out, dtype=DTYPE)
        ppl = perplexity(served, max_tokens=args.max_tokens, progress=False)
        return {"perplexity": ppl.perplexity, "quantize_seconds": child["seconds"],
                "peak_rss_mb": child["peak_rss_mb"], "eval_seconds": ppl.seconds,
                "checkpoint_mb": sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e6,
                **quantized_share(report, non_embedding_params)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def previous_rows(meta: dict) -> list[dict]:
    """Rows of an earlier run on the same tokens and the same upcycled model (for --schemes)."""
    path = RESULTS / "quality_moe.json"
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    same = all(data["meta"].get(k) == meta[k] for k in ("max_tokens", "dtype", "upcycling_settings"))
    return data["rows"] if same else []


def write(rows: list[dict], equality: dict, upcycling: dict, meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quality_moe.json").write_text(json.dumps(
        {"meta": meta, "upcycling": upcycling, "equality_check": equality, "rows": rows}, indent=2) + "\n")
    e, u, r = equality, upcycling, equality["routing"]
    lines = [
        "# Quantization quality: dense demo model vs its upcycled MoE", "",
        f"The MoE is **upcycled, not a pretrained MoE**: {u['architecture']}, built from SmolLM2-135M-Instruct "
        f"by copying each decoder layer's MLP into {u['num_experts']} identical experts (top-{u['top_k']} "
        f"routing) and giving each router random weights ({u['router_init']}); attention, norms and "
        f"embeddings are the dense model's. Mixtral renormalizes the top-k weights to sum to 1, so it "
        f"computes the dense model's function while routing tokens as a MoE does "
        f"(`benchmarks/moe_upcycle.py`). {u['parameters'] / 1e6:.0f}M parameters, of which "
        f"{u['expert_parameters'] / 1e6:.0f}M ({100 * u['expert_parameters'] / u['parameters']:.0f}%) are experts.",
        "",
        f"Check before quantizing: perplexity dense **{e['dense_perplexity']:.4f}**, upcycled MoE "
        f"**{e['moe_perplexity']:.4f}** ({e['change_pct']:+.4f}%, tolerance ±{e['tolerance_pct']}%); "
        f"max |logit difference| {e['max_abs_logit_difference']:.1e} on 1,024 tokens. Routing on "
        f"{r['tokens']:,} tokens: share of assignments per expert "
        f"{', '.join(f'{s:.2f}' for s in r['share_per_expert'])} "
        f"(per layer {r['min_share_any_layer']:.2f} to {r['max_share_any_layer']:.2f}).", "",
        f"Perplexity on the first {meta['max_tokens']:,} tokens of the built-in corpus's held-out split "
        f"({meta['method']}), each quantized checkpoint reloaded through llmquant's runtime; both models "
        f"quantized with the same recipe and calibration windows. Change: against the same model unquantized. "
        f"Agree: the two changes within {AGREEMENT_POINTS} points.", "",
        "| scheme | dense ppl | dense change | MoE ppl | MoE change | difference (points) | agree | "
        "MoE params quantized | expert projections quantized |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['name']} | | | | | | failed: {row['error'].splitlines()[-1][:120]} | | |")
            continue
        d, m = row["dense"], row["moe"]
        total_expert_proj = 3 * u["num_experts"] * meta["num_layers"]
        lines.append(
            f"| {row['name']} | {d['perplexity']:.3f} | {d['change_pct']:+.2f}% | {m['perplexity']:.3f} | "
            f"{m['change_pct']:+.2f}% | {row['difference_points']:+.2f} | {'yes' if row['agree'] else '**no**'} | "
            f"{m['quantized_share_pct']:.1f}% | {m['expert_layers_quantized']} of {total_expert_proj} |")
    lines += ["", "MoE params quantized: the share of the MoE's non-embedding parameters (norms and routers "
              "included) that its quantization report gives as quantized (its coverage section; where a report "
              "has none, the weights of the layers it lists); the dense model's share is "
              + ", ".join(f"{row['dense']['quantized_share_pct']:.1f}% ({row['name']})" for row in rows
                          if not row.get("error")) + ".",
              "", f"Machine: {meta['cpu']}; torch {meta['torch']}, transformers {meta['transformers']}, "
              f"{meta['threads']} threads, {meta['dtype']} compute."]
    commands: dict[str, int] = {}
    for row in rows:
        commands[row["command"]] = commands.get(row["command"], 0) + 1
    lines += [f"Rows measured by `{c}`: {n}" for c, n in commands.items()] + [""]
    (RESULTS / "quality_moe.md").write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32768,
                        help="held-out tokens per perplexity (default 32768, as benchmarks/quality.py)")
    parser.add_argument("--schemes", nargs="+", default=None, metavar="NAME",
                        help="scheme names or prefixes to run: " + "; ".join(n for n, _ in SCHEMES))
    parser.add_argument("--upcycle-only", action="store_true",
                        help="build the MoE and check its perplexity equals the dense model's; no quantization, "
                             "no result files")
    parser.add_argument("--experts", type=int, default=4, help="experts per layer (default 4)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the routers' random weights and centering windows (default 0)")
    parser.add_argument("--router-std", type=float, default=0.02,
                        help="std of the routers' random weights (default 0.02)")
    parser.add_argument("--moe-dir", type=Path, default=None,
                        help="keep the upcycled model in this folder (reused by later runs with the same "
                             "settings); default: a temporary folder, removed at the end")
    args = parser.parse_args()
    names = [n for n, _ in SCHEMES]
    chosen = names
    if args.schemes:
        chosen = list(dict.fromkeys(n for p in args.schemes for n in names
                                    if n == p or (p not in names and n.startswith(p))))
        if not chosen:
            parser.error(f"--schemes {args.schemes} matches none of: {'; '.join(names)}")

    from llmquant.loading.demo import ensure_demo_model

    demo_dir = ensure_demo_model()
    tmp = None
    if args.moe_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="llmquant-upcycled-"))
        moe_dir = tmp / "moe"
    else:
        moe_dir = args.moe_dir.expanduser().absolute()
    try:
        upcycling = build_moe(demo_dir, moe_dir, args)
        equality = check_equal_function(demo_dir, moe_dir, args)
        if args.upcycle_only:
            print("upcycle-only: the upcycled MoE computes the dense model's function; nothing written.")
            return 0

        import transformers

        m = equality["method"]
        meta = {"max_tokens": args.max_tokens, "dtype": DTYPE,
                "method": f"window {m.get('window')}, stride {m.get('stride')}, token-level", "method_detail": m,
                "upcycling_settings": {k: upcycling[k] for k in ("num_experts", "top_k", "router_init")},
                "num_layers": json.loads((moe_dir / "config.json").read_text())["num_hidden_layers"],
                "calibration": CAL, "torch": torch.__version__, "transformers": transformers.__version__,
                "threads": torch.get_num_threads(), "cpu": cpu_description(),
                "machine": f"{platform.machine()} {platform.processor()}".strip(),
                "command": "python " + shlex.join(sys.argv), "date": time.strftime("%Y-%m-%d")}
        embedding = upcycling["embedding_parameters"]
        baselines = {"dense": (demo_dir, equality["dense_perplexity"], upcycling["dense_parameters"] - embedding),
                     "moe": (moe_dir, equality["moe_perplexity"], upcycling["parameters"] - embedding)}
        rows = previous_rows(meta) if args.schemes else []
        failed = False
        for name in chosen:
            kwargs = dict(SCHEMES)[name]
            row = {"name": name, "options": kwargs, "command": meta["command"], "date": meta["date"]}
            try:
                for which, (folder, base_ppl, params) in baselines.items():
                    r = measure(kwargs, folder, params, args)
                    r["change_pct"] = 100.0 * (r["perplexity"] / base_ppl - 1.0)
                    row[which] = r
                    print(f"{name} {which}: perplexity {r['perplexity']:.3f} ({r['change_pct']:+.2f}%), "
                          f"{r['quantized_share_pct']:.1f}% of parameters quantized "
                          f"({r['expert_layers_quantized']} expert projections), {r['quantize_seconds']:.0f} s",
                          flush=True)
                row["difference_points"] = row["moe"]["change_pct"] - row["dense"]["change_pct"]
                row["agree"] = bool(math.isfinite(row["difference_points"])
                                    and abs(row["difference_points"]) <= AGREEMENT_POINTS)
                print(f"{name}: MoE change - dense change = {row['difference_points']:+.2f} points "
                      f"({'within' if row['agree'] else 'NOT within'} {AGREEMENT_POINTS})", flush=True)
            except Exception as e:  # record it, measure the other schemes, exit non-zero at the end
                failed = True
                row = {k: v for k, v in row.items() if k not in ("dense", "moe")}
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"{name}: FAILED: {row['error'][-2000:]}", file=sys.stderr, flush=True)
            rows = [r for r in rows if r["name"] != name] + [row]
            rows.sort(key=lambda r: names.index(r["name"]) if r["name"] in names else 999)
            write(rows, equality, upcycling, meta)
        return 1 if failed else 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
