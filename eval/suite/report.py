"""report.md: one table per task, deltas against the first model, the method under each table."""

from __future__ import annotations

import math
from typing import Any


def markdown_report(results: dict[str, Any]) -> str:
    suite, env = results["suite"], results["environment"]
    lines = [f"# Eval suite: {suite['name']}", ""]
    if suite.get("description"):
        lines += [suite["description"], ""]
    lines += [f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}, llmquant {env['llmquant']}, "
              f"{env['torch_threads']} torch threads; {results['seconds']:.0f} s in all "
              f"({sum(e.get('reused', False) for e in results['results'])} results reused). "
              f"Command: `{env.get('command', '')}`", ""]
    lines += _models_table(results)
    by_task: dict[str, list[dict]] = {}
    for e in results["results"]:
        by_task.setdefault(e["task"], []).append(e)
    for label, entries in by_task.items():
        kind = entries[0]["type"]
        table = {"perplexity": _perplexity, "agreement": _agreement, "throughput": _throughput,
                 "load": _load}[kind](entries)
        lines += [f"## {label}", ""] + table + _method(entries) + [""]
    problems = [e for e in results["results"] if e["status"] != "ok"]
    if problems:
        lines += ["## Failures and skips", "", "| model | task | status | reason |", "|---|---|---|---|"]
        lines += [f"| {e['model']} | {e['task']} | {e['status']} | {_cell(e.get('error', ''))} |" for e in problems]
        lines.append("")
    if results.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in results["plots"]] + [""]
    return "\n".join(lines)


def _models_table(results: dict) -> list[str]:
    lines = ["| model | kind | size | load s |", "|---|---|---:|---:|"]
    for m in results["models"]:
        size = _mb(m.get("size_bytes"))
        if size and m.get("size_kind") == "memory footprint":
            size += " (in memory)"
        lines.append(f"| {m['name']} | {m.get('kind', '')} | {size} | {_f(m.get('load_seconds'), 1)} |")
    return lines + [""]


def _ok(entries):
    return [e for e in entries if e["status"] == "ok"]


def _perplexity(entries: list[dict]) -> list[str]:
    lines = ["| model | perplexity | vs first | bits/byte | NLL/token | tokens | window ppl min / median / max | s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = next((e["result"]["perplexity"] for e in _ok(entries)), None)
    for e in entries:
        if e["status"] != "ok":
            lines.append(f"| {e['model']} | {e['status']} |  |  |  |  |  |  |")
            continue
        r = e["result"]
        windows = sorted(math.exp(min(x, 700)) for x in r["per_window"])
        spread = f"{windows[0]:.2f} / {windows[len(windows) // 2]:.2f} / {windows[-1]:.2f}" if windows else ""
        lines.append(f"| {e['model']} | {r['perplexity']:.4f} | {_pct(r['perplexity'], base)} | "
                     f"{r['bits_per_byte']:.4f} | {r['nll_per_token']:.4f} | {r['num_tokens_scored']:,} | {spread} | "
                     f"{r['seconds']:.1f} |")
    return lines


def _agreement(entries: list[dict]) -> list[str]:
    lines = ["| model | KL mean | KL median | KL p99 | top-1 agreement | perplexity | base perplexity |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for e in entries:
        if e["status"] != "ok":
            lines.append(f"| {e['model']} | {e['status']} |  |  |  |  |  |")
            continue
        r = e["result"]
        top1 = r.get("top1_agreement")
        lines.append(f"| {e['model']} | {_f(r.get('kl_mean'), 5)} | {_f(r.get('kl_median'), 5)} | "
                     f"{_f(r.get('kl_p99'), 4)} | {'' if top1 is None else f'{100 * top1:.2f}%'} | "
                     f"{r['perplexity']:.4f} | {_f(r.get('base_perplexity'), 4)} |")
    return lines


def _throughput(entries: list[dict]) -> list[str]:
    ok = _ok(entries)
    lengths = sorted({p["prompt_tokens"] for e in ok for p in e["result"]["prefill"]})
    batches = sorted({d["batch_size"] for e in ok for d in e["result"]["decode"]})
    head = (["model"] + [f"prefill {n} tok/s" for n in lengths] + [f"decode b{b} tok/s" for b in batches]
            + ["vs first (decode)", "peak RSS added", "CUDA peak", "load s", "size"])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    first = None
    for e in entries:
        if e["status"] != "ok":
            lines.append(f"| {e['model']} | {e['status']} |" + " |" * (len(head) - 2))
            continue
        r = e["result"]
        prefill = {p["prompt_tokens"]: p["tokens_per_s"] for p in r["prefill"]}
        decode = {d["batch_size"]: d["tokens_per_s"] for d in r["decode"]}
        first = first or decode
        ratios = "; ".join(f"b{b} {decode[b] / first[b]:.2f}x" for b in batches if b in decode and first.get(b))
        cells = ([e["model"]] + [_f(prefill.get(n), 0) for n in lengths] + [_f(decode.get(b), 1) for b in batches]
                 + [ratios, _mb(r.get("peak_rss_over_baseline_bytes", r.get("peak_rss_bytes"))),
                    _mb(r.get("cuda_peak_allocated_bytes")),
                    _f(r.get("load_seconds"), 1), _mb(r.get("checkpoint_bytes"))])
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", "Peak RSS added: the process's peak resident memory during the run minus its memory just "
                    "before this model was loaded (other models the suite keeps loaded are not counted)."]


def _load(entries: list[dict]) -> list[str]:
    lines = ["| model | concurrency | rate req/s | ok / failed | req/s | output tok/s | TTFT p50 / p90 / p99 ms | "
             "TPOT p50 / p90 / p99 ms | ITL p50 / p99 ms | E2E p50 / p99 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e in entries:
        if e["status"] != "ok":
            lines.append(f"| {e['model']} | {e['status']} |  |  |  |  |  |  |  |  |")
            continue
        for r in e["result"]["runs"]:
            m = r["method"]
            t, p, i, e2e = r["ttft_ms"], r["tpot_ms"], r["itl_ms"], r["e2e_ms"]
            lines.append(
                f"| {e['model']} | {m['concurrency'] or ''} | {m['request_rate'] or 'inf'} | "
                f"{r['completed']} / {r['failed']} | {r['request_throughput']:.2f} | {r['output_throughput']:.1f} | "
                f"{_f(t['p50'], 0)} / {_f(t['p90'], 0)} / {_f(t['p99'], 0)} | "
                f"{_f(p['p50'], 1)} / {_f(p['p90'], 1)} / {_f(p['p99'], 1)} | {_f(i['p50'], 1)} / {_f(i['p99'], 1)} | "
                f"{_f(e2e['p50'], 0)} / {_f(e2e['p99'], 0)} |")
    return lines


def _method(entries: list[dict]) -> list[str]:
    ok = _ok(entries)
    if not ok:
        return []
    r = ok[0]["result"]
    method = r.get("method") or (r.get("runs") or [{}])[0].get("method") or {}
    drop = {"endpoint", "served_model", "concurrency", "request_rate", "dataset", "split"}  # per row, or in `data`
    keep = {k: v for k, v in method.items() if k not in drop and v is not None}
    return ["", "Method: " + "; ".join(f"{k} {v}" for k, v in keep.items()) + "."]


def _pct(value: float, base: float | None) -> str:
    if base is None or not base:
        return ""
    return f"{100 * (value / base - 1):+.2f}%"


def _f(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:,.{digits}f}"


def _mb(n) -> str:
    return "" if n is None else f"{n / 2**20:,.1f} MiB"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:400]
