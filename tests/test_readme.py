"""The README and docs/ tell the truth about the repository: the commands they give are the ones CI
and setup run, the numbers they quote are those of the committed result files, and every link
resolves."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
RESULTS = ROOT / "benchmarks" / "results"


def _module(path: Path):
    """A helper module loaded from its file (tests/ and scripts/ are not packages)."""
    spec = importlib.util.spec_from_file_location(f"_readme_check_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = text.find("\n## ", start + len(heading))
    return text[start: nxt if nxt != -1 else len(text)]


def _table_rows(text: str) -> list[list[str]]:
    """The cells of each Markdown table row in `text`, separator rows left out."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.fullmatch(r"\|[-:| ]+\|", line):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_readme_is_short():
    # A newcomer reads it in ten minutes; the details live in docs/.
    assert len(README.read_text().splitlines()) <= 200


def test_ci_runs_the_test_command_the_readme_gives():
    ci_commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == ["bash scripts/test.sh"]
    readme = README.read_text()
    assert re.search(r"^bash scripts/test\.sh(\s|$)", readme, re.M)
    assert re.search(r"^bash scripts/setup\.sh(\s|$)", readme, re.M)


def test_setup_demo_job_is_gptq_w4a16_group_64():
    lines = [line for line in (ROOT / "scripts" / "setup.sh").read_text().splitlines()
             if re.search(r"\bquantize\b", line) and "LLMQUANT" in line]
    assert len(lines) == 1, lines
    words = shlex.split(lines[0])
    assert words[words.index("--scheme") + 1] == "W4A16"
    assert words[words.index("--group-size") + 1] == "64"
    assert "--gptq" in words
    # The project's defaults otherwise: no observer or calibration overrides.
    assert not any(w.startswith(("--observer", "--num-samples", "--seq-len")) for w in words)


def test_every_relative_link_resolves():
    broken = []
    for doc in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+://|#|mailto:", target):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            if not path.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken


def test_support_matrix_block_covers_every_tested_architecture():
    support_matrix = _module(ROOT / "scripts" / "support_matrix.py")
    architectures = _module(ROOT / "tests" / "architectures.py").ARCHITECTURES
    text = README.read_text()
    assert text.count(support_matrix.START) == 1 and text.count(support_matrix.END) == 1
    block = text[text.index(support_matrix.START): text.index(support_matrix.END)]
    header, *rows = _table_rows(block)
    assert header == ["architecture", *support_matrix.COLUMNS.values()]
    assert {row[0].strip("`") for row in rows} == set(architectures)


def test_readme_cost_table_quotes_the_current_quality_results():
    """Each perplexity and change in the README's table is a dense row of quality_moe.json (the
    current code's reference run), and the README names that file and its CPU."""
    results = json.loads((RESULTS / "quality_moe.json").read_text())
    baseline = results["equality_check"]["dense_perplexity"]
    measured = {round(baseline, 3): None}
    for row in results["rows"]:
        measured[round(row["dense"]["perplexity"], 3)] = (round(row["dense"]["change_pct"], 1),
                                                          round(row["dense"]["checkpoint_mb"]))
    section = _section(README.read_text(), "## What it costs")
    assert "quality_moe" in section and "Xeon" in results["meta"]["cpu"] and "Xeon" in section
    rows = _table_rows(section)[1:]
    assert len(rows) >= 3
    for cells in rows:
        ppl = float(cells[2])
        assert ppl in measured, cells
        if measured[ppl] is not None:
            change, mb = measured[ppl]
            assert float(cells[3].rstrip("%")) == change, cells
            assert float(cells[1].split()[0]) == mb, cells


def test_one_baseline_per_split_matches_its_result_file():
    """docs/benchmarks.md defines the original model's perplexity once per evaluation split; each
    value is the one its result file recorded."""
    rows = {row[0]: row for row in _table_rows(_section((ROOT / "docs" / "benchmarks.md").read_text(),
                                                        "## One baseline per evaluation split"))[1:]}
    quality = json.loads((RESULTS / "quality_moe.json").read_text())
    distill = json.loads((RESULTS / "distill.json").read_text())
    suite = json.loads((RESULTS / "eval-demo" / "results.json").read_text())
    expected = {
        "32,768": (quality["equality_check"]["dense_perplexity"], quality["meta"]["max_tokens"]),
        "16,384": (distill["rows"][0]["perplexity"], distill["meta"]["eval_tokens"]),
        "4,096": (next(r["result"]["perplexity"] for r in suite["results"]
                       if r["model"] == "bf16" and r["task"] == "perplexity"),
                  next(r["params"]["max_tokens"] for r in suite["results"]
                       if r["model"] == "bf16" and r["task"] == "perplexity")),
    }
    for tokens, (ppl, max_tokens) in expected.items():
        row = next(r for split, r in rows.items() if split.startswith(f"first {tokens} tokens"))
        assert int(tokens.replace(",", "")) == max_tokens
        assert float(row[2].strip("*")) == round(ppl, 3), row


def test_readme_speed_table_quotes_the_current_serving_results():
    """Each row of the README's speed table is a row of serving.json (engine, model, streams,
    output tok/s, TTFT p50 / p99 and TPOT p50 in ms), whose CPU the section names."""
    results = json.loads((RESULTS / "serving.json").read_text())
    measured = {(r["model"], r["engine"], r["concurrency"]): r for r in results["rows"] if "concurrency" in r}
    section = _section(README.read_text(), "## What it gains: speed")
    assert "serving.md" in section and "Xeon" in results["meta"]["cpu"] and "Xeon" in section
    header, *rows = _table_rows(section)
    model = header[0].split()[0]  # "W4A16 group 64 (...)": the table's model
    assert len(rows) >= 9
    for cells in rows:
        engine = next(e for e in ("llmquant serve", "vLLM CPU", "llama.cpp server") if e in cells[0])
        row = next(r for (m, e, c), r in measured.items()
                   if m == model and e.startswith(engine) and c == int(cells[1]))
        assert round(row["output_tokens_per_s"], 1) == float(cells[2]), cells
        p50, p99 = (float(v) for v in cells[3].removesuffix(" ms").split(" / "))
        assert (round(row["ttft_p50_s"] * 1000), round(row["ttft_p99_s"] * 1000)) == (p50, p99), cells
        assert round(row["tpot_p50_s"] * 1000) == float(cells[4].removesuffix(" ms")), cells
