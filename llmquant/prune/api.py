"""`llmquant.prune(...)`: prune a model's Linear layers and save it as a dense checkpoint.

The pruned weights are stored as zeros in the model's own dtype and layout, which transformers,
vLLM and llmquant load like the original. compressed-tensors' bitmask formats (`sparse-bitmask`,
`sparse-24-bitmask`) and a `sparsity_config` in config.json are not written: compressed-tensors
dropped them after 0.14 and vLLM rejects a checkpoint that declares 2:4 sparsity since 0.19
("Sparse24 models are no longer supported"), so declaring it would make the folder unloadable.
The sparsity is recorded in `prune_report.json` / `.md` and in `recipe.yaml` instead. To prune
and quantize in one run, use `llmquant quantize --prune ...` (the same recipe section).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from llmquant.config.fields import reject_unknown_keys
from llmquant.config.options import LoadOptions
from llmquant.config.recipe import CalibrationConfig, patterns
from llmquant.config.sparsity import SparsityConfig
from llmquant.errors import InvalidConfigError
from llmquant.quant.pipeline.report import PRUNE_REPORT_JSON, PRUNE_REPORT_MD

PRUNE_RECIPE = "recipe.yaml"

SEQUENTIAL_BATCH = 4


@dataclass
class PruneResult:
    model: torch.nn.Module
    tokenizer: object
    output_dir: Path | None
    report: dict  # settings, per-layer sparsity and error, measured sparsity, verification, timings
    seconds: float

    @property
    def verification(self) -> dict | None:
        return self.report.get("verification")


def prune(model=None, output=None, *, method: str = "sparsegpt", sparsity: float = 0.5,
          pattern: str = "unstructured", allocation: str = "uniform", allocation_range: float = 0.08,
          targets=("Linear",), ignore=("lm_head",),
          calibration: CalibrationConfig | None = None, verify_tokens: int = 2048, overwrite: bool = False,
          progress: bool = True, load: LoadOptions | None = None, **block: int | float) -> PruneResult:
    """Prune `model` (a source as for `load_model`; None: the demo model) and, with `output`,
    save it atomically. `block` takes SparsityConfig's block_size / dampening (sparsegpt) and iterations (admm)."""
    from llmquant.arch.experts import linearize
    from llmquant.arch.registry import model_spec
    from llmquant.checkpoint.atomic import atomic_directory, check_output_dir
    from llmquant.data import calibration_batches
    from llmquant.distill.export import write_float_checkpoint
    from llmquant.loading import load_model
    from llmquant.prune.sequential_prune import prune_model
    from llmquant.quant.pipeline.finish import verify_windows
    from llmquant.quant.pipeline.targets import linear_layers, validate_patterns
    from llmquant.quant.pipeline.verify import compare_to_reference, reference_logprobs

    t0 = time.perf_counter()
    reject_unknown_keys(block, ("block_size", "dampening", "iterations"), "the arguments of prune()")
    cfg = SparsityConfig(method=method, pattern=pattern, sparsity=sparsity, allocation=allocation,
                         allocation_range=allocation_range, **block)
    cal = calibration or CalibrationConfig()
    targets, ignore = patterns(targets, "targets"), patterns(ignore, "ignore")
    validate_patterns(targets, "targets")
    validate_patterns(ignore, "ignore")
    if output is not None:
        check_output_dir(output, overwrite)
    loaded = load_model(model, **(load or LoadOptions()).kwargs())
    if loaded.quantization_config is not None:
        raise InvalidConfigError(f"{loaded.source.describe()} is already quantized; prune its original model, or "
                                 "prune and quantize in one run with `llmquant quantize --prune METHOD`.")
    net, tokenizer = loaded.model, loaded.tokenizer
    linearize(net, model_spec(net).experts)  # MoE experts as Linear layers, pruned like any other
    layers = dict(linear_layers(net, targets, ignore))
    if not layers:
        raise InvalidConfigError(f"No Linear layer matches targets {list(targets)} minus ignore {list(ignore)}.")
    windows = verify_windows(tokenizer, cal, verify_tokens) if verify_tokens else None
    reference = reference_logprobs(net, windows, progress) if windows is not None else None
    batches = None
    if cfg.needs_data:
        batches = calibration_batches(tokenizer, cal.dataset, num_samples=cal.num_samples, seq_len=cal.seq_len,
                                      seed=cal.seed, text_field=cal.text_field, config_name=cal.config_name)
    _say(progress, f"{cfg.describe()} of {len(layers)} Linear layers of {loaded.source.describe()}"
         + (f" on {batches.shape[0]} x {batches.shape[1]} calibration tokens" if batches is not None else ""))
    t = time.perf_counter()
    reports = prune_model(net, layers, cfg, batches, batch_size=SEQUENTIAL_BATCH, progress=progress)
    prune_seconds = time.perf_counter() - t
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    total = sum(m.weight.numel() for m in layers.values())
    report = {"source": loaded.source.describe(), "sparsity": {**cfg.to_dict(), "measured": zeros / total,
                                                                "layers": len(layers)},
              "targets": list(targets), "ignore": list(ignore),
              "calibration": _calibration_dict(cal) if batches is not None else None,
              "layers": [r.to_dict() for r in sorted(reports.values(), key=_worst_first)],
              "verification": None, "timings_s": {"prune": prune_seconds}}
    if windows is not None:
        report["verification"] = compare_to_reference(net, windows, reference, progress).to_dict()
    out_dir = None
    if output is not None:
        with atomic_directory(output, overwrite=overwrite) as tmp:
            write_float_checkpoint(net, tokenizer, tmp, loaded.source_dtype)
            recipe = {"sparsity": cfg.to_dict(), "targets": list(targets), "ignore": list(ignore),
                      "calibration": _calibration_dict(cal)}
            (tmp / PRUNE_RECIPE).write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
            report["timings_s"]["total"] = time.perf_counter() - t0
            (tmp / PRUNE_REPORT_JSON).write_text(json.dumps(report, indent=2), encoding="utf-8")
            (tmp / PRUNE_REPORT_MD).write_text(report_markdown(report), encoding="utf-8")
        out_dir = Path(output).expanduser().absolute()
    report["timings_s"]["total"] = time.perf_counter() - t0
    return PruneResult(model=net, tokenizer=tokenizer, output_dir=out_dir, report=report,
                       seconds=report["timings_s"]["total"])


def _worst_first(r) -> float:
    return r.output_sqnr_db if r.output_sqnr_db is not None else r.weight_sqnr_db


def _calibration_dict(cal: CalibrationConfig) -> dict:
    from dataclasses import asdict

    return asdict(cal)


def report_markdown(report: dict) -> str:
    sp = report["sparsity"]
    what = sp["pattern"] if sp["pattern"] != "unstructured" else f"{sp['sparsity']:.0%} unstructured"
    out = [f"# Pruning report: {report['source']}", "",
           f"- {sp['method']} {what}: {100 * sp['measured']:.2f}% of the weights of {sp['layers']} Linear layers "
           "are zero (stored as zeros in a dense checkpoint)"]
    if report.get("calibration"):
        c = report["calibration"]
        out.append(f"- calibration: {c['num_samples']} x {c['seq_len']} tokens from {c['dataset']} (seed {c['seed']})")
    if report.get("verification"):
        v = report["verification"]
        out.append(f"- verification against the original: mean KL {v['kl_mean']:.5f}, top-1 agreement "
                   f"{100 * v['top1_agreement']:.2f}% on {v['tokens']} held-out tokens")
    out.append(f"- time: {report['timings_s'].get('total', 0):.1f} s")
    out += ["", "| layer | zeros % | weight SQNR dB | output SQNR dB | note |", "|---|---:|---:|---:|---|"]
    for r in report["layers"]:
        o = f"{r['output_sqnr_db']:.2f}" if r["output_sqnr_db"] is not None else ""
        out.append(f"| {r['name']} | {100 * r['sparsity']:.2f} | {r['weight_sqnr_db']:.2f} | {o} | {r['note'] or ''} |")
    return "\n".join(out) + "\n"


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr)
