"""The per-layer quantization report, written next to the checkpoint and summarized on screen.

For every quantized layer: weight SQNR (dB; about 6 dB per bit, so INT8 ~ 40-50, INT4 ~ 20-25)
and, for activation schemes, activation SQNR and the share of calibration values the chosen
range clips. Worst layers first, so a user sees where to raise the percentile, change the
observer, or keep a layer in full precision (--ignore).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmquant.quant.pipeline.coverage import Coverage
from llmquant.quant.pipeline.expert_calibration import ALL_TOKENS

REPORT_JSON = "quantization_report.json"
REPORT_MD = "quantization_report.md"
PRUNE_REPORT_JSON, PRUNE_REPORT_MD = "prune_report.json", "prune_report.md"  # `llmquant prune`'s, beside its dense checkpoint
# Short names of the data passes (context.DataPass.step) for the one-line summary.
PASS_NAMES = {"mixed_precision": "mixed-precision sensitivity", "smoothquant": "SmoothQuant", "awq": "AWQ",
              "gptq": "GPTQ", "static_scales": "static activation scales", "activation_report": "activation report",
              "verification": "verification"}


@dataclass
class LayerReport:
    name: str
    out_features: int
    in_features: int
    scheme: str
    weight_sqnr_db: float
    activation_sqnr_db: float | None = None
    activation_clip_pct: float | None = None
    activation_absmax: float | None = None
    activation_threshold: float | None = None
    output_sqnr_db: float | None = None  # GPTQ: layer outputs on the calibration inputs
    note: str | None = None
    calibration_tokens: int | None = None  # MoE experts: calibration tokens routed to the expert
    sparsity: float | None = None  # pruned models: fraction of the saved weight that is zero

    def add_activation_stats(self, stat, static: bool) -> None:
        """The activation columns from a layer's calibration statistics (None: weight-only);
        clipping and range only mean something for static (calibrated) scales."""
        if stat is None:
            return
        self.activation_sqnr_db = stat.sqnr_db()
        if static:
            self.activation_clip_pct = 100.0 * stat.clip_fraction()
            self.activation_absmax = stat.absmax
            self.activation_threshold = stat.threshold()

    @property
    def worst_sqnr(self) -> float:
        values = [self.weight_sqnr_db] + ([self.activation_sqnr_db] if self.activation_sqnr_db is not None else [])
        return min(values)


@dataclass
class QuantReport:
    source: dict
    recipe: dict
    layers: list[LayerReport] = field(default_factory=list)
    kept_full_precision: dict[str, str] = field(default_factory=dict)  # name -> reason
    calibration: dict | None = None  # the calibration text, summed over every pass that read it
    data_passes: list[dict] = field(default_factory=list)  # each pass of text through the model (context.DataPass)
    smoothquant: dict | None = None
    mixed_precision: dict | None = None
    self_distill: dict | None = None  # self-distillation: settings, losses, held-out perplexity before / after
    sparsity: dict | None = None  # pruning: its settings and the measured fraction of zeros (sparsity_report.py)
    verification: dict | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    checkpoint_bytes: int | None = None
    coverage: Coverage | None = None  # share of parameters quantized; what stayed in full precision, why

    def worst_first(self) -> list[LayerReport]:
        return sorted(self.layers, key=lambda r: (r.worst_sqnr, -(r.activation_clip_pct or 0.0)))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(r) for r in self.worst_first()]
        d["coverage"] = self.coverage.to_dict() if self.coverage is not None else None
        d["summary"] = self.summary_numbers()
        return _finite(d)

    def summary_numbers(self) -> dict:
        w = [r.weight_sqnr_db for r in self.layers if math.isfinite(r.weight_sqnr_db)]
        a = [r.activation_sqnr_db for r in self.layers if r.activation_sqnr_db is not None
             and math.isfinite(r.activation_sqnr_db)]
        out = {"quantized_layers": len(self.layers), "full_precision_layers": len(self.kept_full_precision)}
        if w:
            out.update(weight_sqnr_db_mean=sum(w) / len(w), weight_sqnr_db_min=min(w))
        if a:
            out.update(activation_sqnr_db_mean=sum(a) / len(a), activation_sqnr_db_min=min(a))
        o = [r.output_sqnr_db for r in self.layers if r.output_sqnr_db is not None and math.isfinite(r.output_sqnr_db)]
        if o:
            out.update(output_sqnr_db_mean=sum(o) / len(o), output_sqnr_db_min=min(o))
        return out

    # ---- human output ------------------------------------------------------------------------
    def warnings(self) -> list[str]:
        """What the user must not miss (e.g. most of the model left unquantized)."""
        return self.coverage.warnings() if self.coverage is not None else []

    def summary_lines(self, worst: int = 5, warnings: bool = True) -> list[str]:
        s = self.summary_numbers()
        lines = [f"quantized {s['quantized_layers']} layers"
                 + (f", kept {s['full_precision_layers']} in full precision" if s["full_precision_layers"] else "")]
        if "weight_sqnr_db_mean" in s:
            lines.append(f"weight SQNR: mean {s['weight_sqnr_db_mean']:.1f} dB, worst {s['weight_sqnr_db_min']:.1f} dB")
        if "output_sqnr_db_mean" in s:
            lines.append(f"layer output SQNR on calibration inputs: mean {s['output_sqnr_db_mean']:.1f} dB, "
                         f"worst {s['output_sqnr_db_min']:.1f} dB")
        if "activation_sqnr_db_mean" in s:
            lines.append(f"activation SQNR: mean {s['activation_sqnr_db_mean']:.1f} dB, "
                         f"worst {s['activation_sqnr_db_min']:.1f} dB")
        if self.data_passes:
            lines.append("data: " + "; ".join(f"{_pass_name(p)} {p['samples']} x {p['seq_len']}"
                                               + (" held-out" if p["split"] != "calibration" else "")
                                               for p in self.data_passes))
        if self.self_distill:
            lines.append(self_distill_line(self.self_distill))
        if self.sparsity:
            lines.append(sparsity_line(self.sparsity))
        tokens = [r.calibration_tokens for r in self.layers if r.calibration_tokens is not None]
        if tokens:
            fallback = sum(ALL_TOKENS in (r.note or "") for r in self.layers)
            tokens.sort()
            lines.append(f"MoE experts: {min(tokens)} / {tokens[len(tokens) // 2]} / {max(tokens)} routed calibration "
                         f"tokens (min / median / max); {fallback} expert layers calibrated on every token")
        lines.append(f"worst {min(worst, len(self.layers))} layers:")
        for r in self.worst_first()[:worst]:
            lines.append("  " + _layer_line(r))
        if self.coverage is not None:
            lines += self.coverage.lines() + (self.warnings() if warnings else [])  # the warning comes last
        else:
            for name, reason in list(self.kept_full_precision.items())[:worst]:
                lines.append(f"  {name}: kept in full precision ({reason})")
        return lines

    def to_markdown(self) -> str:
        src = self.source
        out = [f"# Quantization report: {src.get('name')}", "",
               f"- scheme: {self.recipe['quantize'].get('scheme') or 'custom'}",
               f"- source: {src.get('description', src.get('name'))}"]
        if self.calibration:
            out.append(f"- calibration: {self.calibration.get('description', '')}")
        if self.data_passes:
            out.append("- data used, pass by pass:")
            out += [f"  - {_describe_pass(p)}" for p in self.data_passes]
        if self.smoothquant:
            out.append(f"- SmoothQuant: alpha {self.smoothquant['alpha']}, {self.smoothquant['applied']} mappings "
                       f"smoothed, {len(self.smoothquant['skipped'])} skipped")
        if self.self_distill:
            out.append(f"- {self_distill_line(self.self_distill)}")
        if self.sparsity:
            out.append(f"- {sparsity_line(self.sparsity)}")
        if self.verification:
            v = self.verification
            out.append(f"- verification (reloaded checkpoint vs original): mean KL {v['kl_mean']:.5f}, "
                       f"top-1 agreement {100 * v['top1_agreement']:.2f}% on {v['tokens']} held-out tokens")
        if self.checkpoint_bytes:
            out.append(f"- checkpoint size: {self.checkpoint_bytes / 1e6:.1f} MB")
        out.append(f"- time: {self.timings_s.get('total', 0):.1f} s")
        out += ["", "| layer | shape | scheme | weight SQNR dB | act SQNR dB | act clipped % | note |",
                "|---|---|---|---:|---:|---:|---|"]
        for r in self.worst_first():
            scheme = r.scheme + (f", {100 * r.sparsity:.1f}% zeros" if r.sparsity is not None else "")
            out.append(f"| {r.name} | {r.out_features}x{r.in_features} | {scheme} | {r.weight_sqnr_db:.2f} | "
                       f"{_fmt(r.activation_sqnr_db)} | {_fmt(r.activation_clip_pct, 4)} | {r.note or ''} |")
        for name, reason in self.kept_full_precision.items():
            out.append(f"| {name} | | full precision | | | | {reason} |")
        return "\n".join(out) + "\n"

    def write(self, folder: Path) -> None:
        with open(folder / REPORT_JSON, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
        (folder / REPORT_MD).write_text(self.to_markdown(), encoding="utf-8")


def _layer_line(r: LayerReport) -> str:
    parts = [f"{r.name}: weight {r.weight_sqnr_db:.1f} dB"]
    if r.activation_sqnr_db is not None:
        parts.append(f"activations {r.activation_sqnr_db:.1f} dB")
    if r.activation_clip_pct is not None:
        parts.append(f"{r.activation_clip_pct:.4f}% of calibration values clipped")
    if r.note:
        parts.append(r.note)
    return ", ".join(parts)


def _pass_name(p: dict) -> str:
    return PASS_NAMES.get(p["step"], p["step"])


def _describe_pass(p: dict) -> str:
    seed = f", seed {p['seed']}" if p.get("seed") is not None else ""
    return (f"{p['purpose']}: {p['samples']} x {p['seq_len']} tokens ({p['tokens']:,}) from {p['dataset']} "
            f"({p['split']} split{seed})")


def _fmt(v: float | None, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _finite(obj):
    """JSON has no inf/nan: write them as strings a reader can still parse."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def self_distill_line(sd: dict) -> str:
    """One line on what self-distillation did and what it gained on held-out text."""
    c, h = sd["config"], sd.get("held_out") or {}
    phases = ([f"{c['block_steps']} steps per decoder layer"] if c.get("block_steps") else []) + \
        ([f"{c['steps']} end-to-end steps ({c['loss']})"] if c.get("steps") else [])
    line = f"self-distillation: {' then '.join(phases)}, training {', '.join(c['train'])}"
    if sd.get("teacher"):
        line += f", teacher {sd['teacher']}"
    if h:
        line += f"; {held_out_change(h)}"
    return line


def held_out_change(h: dict) -> str:
    """Held-out perplexity before -> after self-distillation, and the original's (None when the
    original was served, not loaded)."""
    original = h.get("perplexity_original")
    return (f"held-out perplexity {h['perplexity_before']:.3f} -> {h['perplexity_after']:.3f} (original "
            + (f"{original:.3f})" if original is not None else "served, not measured here)"))


def sparsity_line(sp: dict) -> str:
    """One line: how the model was pruned and how sparse its targeted weights are."""
    what = sp["pattern"] if sp["pattern"] != "unstructured" else f"{sp['sparsity']:.0%} unstructured"
    return (f"sparsity: {sp['method']} {what}; {100 * sp['measured']:.1f}% of the weights of "
            f"{sp['layers']} pruned layers are zero")
