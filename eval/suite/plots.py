"""PNG plots of a suite's results (matplotlib, Agg backend: no display needed).

* perplexity_vs_size.png: each model's perplexity against its checkpoint size;
* throughput_vs_concurrency.png: output tokens/s against concurrency (online load), and decode
  tokens/s against batch size (offline engine);
* latency_percentiles.png: TTFT, TPOT, ITL and E2E latency p50/p90/p99 per model at the highest
  concurrency measured.
A plot is written only when the results it needs exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PERCENTILE_KEYS = ("p50", "p90", "p99")
LATENCIES = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency"))


def write_plots(results: dict[str, Any], folder: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        return []  # matplotlib is a dependency; without it the tables still say everything
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for make in (_perplexity_vs_size, _throughput_vs_concurrency, _latency_percentiles):
        fig = make(results, plt)
        if fig is None:
            continue
        path = folder / f"{make.__name__.lstrip('_')}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _ok(results, kind):
    return [e for e in results["results"] if e["status"] == "ok" and e["type"] == kind]


def _perplexity_vs_size(results, plt):
    sizes = {m["name"]: m.get("size_bytes") for m in results["models"]}
    points = [(sizes.get(e["model"]), e["result"]["perplexity"], e["model"]) for e in _ok(results, "perplexity")]
    points = [p for p in points if p[0]]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (size, ppl, name) in enumerate(sorted(points)):
        ax.scatter(size / 2**20, ppl, s=40)
        # Alternate labels above and below: variants of similar size and quality sit close together.
        ax.annotate(name, (size / 2**20, ppl), textcoords="offset points", xytext=(6, 6) if i % 2 else (-6, -12),
                    ha="left" if i % 2 else "right", fontsize=9)
    ax.set_xlabel("checkpoint size (MiB; bitsandbytes: memory footprint)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"{results['suite']['name']}: perplexity vs size")
    ax.grid(alpha=0.3)
    return fig


def _throughput_vs_concurrency(results, plt):
    load, offline = _ok(results, "load"), _ok(results, "throughput")
    if not load and not offline:
        return None
    panels = [p for p in (load, offline) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    axes = list(axes[0])
    if load:
        ax = axes.pop(0)
        for e in load:
            runs = [r for r in e["result"]["runs"] if r["method"]["concurrency"]]
            runs.sort(key=lambda r: r["method"]["concurrency"])
            ax.plot([r["method"]["concurrency"] for r in runs], [r["output_throughput"] for r in runs], marker="o",
                    label=e["model"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens/s")
        ax.set_title("online (OpenAI API, streaming)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if offline:
        ax = axes.pop(0)
        for e in offline:
            decode = sorted(e["result"]["decode"], key=lambda d: d["batch_size"])
            ax.plot([d["batch_size"] for d in decode], [d["tokens_per_s"] for d in decode], marker="o",
                    label=e["model"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tokens/s")
        ax.set_title("offline (engine)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def _latency_percentiles(results, plt):
    rows = []
    for e in _ok(results, "load"):
        runs = [r for r in e["result"]["runs"] if r["completed"]]
        if runs:
            top = max(runs, key=lambda r: (r["method"]["concurrency"] or 0, r["method"]["request_rate"] or 0))
            rows.append((e["model"], top))
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(LATENCIES), figsize=(4.2 * len(LATENCIES), 4.2))
    width = 0.8 / len(rows)
    for ax, (key, title) in zip(axes, LATENCIES):
        for i, (name, run) in enumerate(rows):
            xs = [j + i * width for j in range(len(PERCENTILE_KEYS))]
            ax.bar(xs, [run[key][p] for p in PERCENTILE_KEYS], width=width, label=name)
        ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(PERCENTILE_KEYS))], PERCENTILE_KEYS)
        ax.set_title(title)
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    concurrency = {r["method"]["concurrency"] for _, r in rows}
    fig.suptitle(f"latency percentiles at concurrency {', '.join(str(c) for c in sorted(concurrency, key=str))}")
    return fig
