"""`run_suite`: every model x task of a suite file, with reuse, failures recorded, and reports.

    from llmquant.eval.suite import run_suite
    results = run_suite("configs/eval/demo.yaml", "runs/demo")   # results.json, report.md, plots/

Reuse: each (model, task) result is stored in OUTPUT/cache/ under a hash of the model's
identity (its files' names, sizes and modification times, its quantize arguments, the
versions of llmquant and of bitsandbytes for baselines; for a URL: the URL and model name)
and the task's parameters. A later run with the same hash reuses the stored result instead of
measuring again, unless `force`. Results of failed tasks are not stored, so they run again.

Failures: a model that cannot be prepared fails all its tasks with its error; a task that
raises is recorded with its error; either way the rest of the suite runs. A model or task that
does not apply (bitsandbytes missing, offline throughput of a URL) is recorded as skipped
with the reason.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from llmquant.eval.suite.config import SuiteConfig
from llmquant.eval.suite.models import SkipModel, SuiteModel, digest, identity, prepare
from llmquant.eval.suite.tasks import SkipTask, run_task
from llmquant.errors import InvalidConfigError

RESULTS_VERSION = 1


def run_suite(config: SuiteConfig | str | os.PathLike, output: str | os.PathLike, *, force: bool = False,
              progress: bool = True) -> dict[str, Any]:
    """Run the suite, write OUTPUT/results.json, report.md and plots/*.png; return the results."""
    suite = config if isinstance(config, SuiteConfig) else SuiteConfig.load(config)
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise InvalidConfigError(f"--output {out} exists and is not a folder.")
    (out / "cache").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    entries: list[dict[str, Any]] = []
    models_info: dict[str, dict[str, Any]] = {}
    kept: dict[str, SuiteModel] = {}  # base models stay loaded while others are compared with them
    bases = {t.params.get("base") or suite.models[0].name for t in suite.tasks if t.task == "agreement"}
    bar = tqdm(total=len(suite.models) * len(suite.tasks), desc=f"suite {suite.name}", unit="task",
               file=sys.stderr, disable=not progress, dynamic_ncols=True, position=0)
    with bar:
        # Bases first, so that every model compared with one finds it loaded.
        for spec in sorted(suite.models, key=lambda m: m.name not in bases):
            ident = identity(spec)
            keys = {t.label: digest({"model": ident, "task": t.task, "params": t.params}) for t in suite.tasks}
            todo, model, model_error = [], None, None
            for t in suite.tasks:
                if spec.tasks is not None and t.label not in spec.tasks:
                    entries.append({"model": spec.name, "task": t.label, "type": t.task, "params": t.params,
                                    "key": keys[t.label], "reused": False, "status": "skipped",
                                    "error": "not among this model's tasks in the suite file"})
                    bar.update()
                    continue
                cached = None if force else _read_cache(out, keys[t.label])
                if cached is not None:
                    entries.append({**cached, "reused": True})
                    models_info.setdefault(spec.name, cached.get("model_info", {}))
                    bar.update()
                else:
                    todo.append(t)
            if todo:
                bar.set_postfix_str(f"preparing {spec.name}")
                try:
                    model = kept.get(spec.name) or prepare(spec, out, progress=progress)
                    models_info[spec.name] = model.info()
                except SkipModel as e:
                    model_error = ("skipped", str(e))
                except Exception as e:  # noqa: BLE001 - a broken model must not stop the suite
                    model_error = ("error", _describe(e))
                if model_error is not None:
                    models_info[spec.name] = {"name": spec.name, "kind": spec.kind, "source": spec.source,
                                              "url": spec.url, model_error[0]: model_error[1]}
            for t in todo:
                bar.set_postfix_str(f"{spec.name}: {t.label}")
                entry = {"model": spec.name, "task": t.label, "type": t.task, "params": t.params,
                         "key": keys[t.label], "reused": False}
                if model_error is not None:
                    entry.update(status=model_error[0], error=model_error[1])
                else:
                    entry.update(_run_one(t, model, kept, suite, out, progress))
                    entry["model_info"] = models_info.get(spec.name, {})
                    if entry["status"] in ("ok", "skipped"):
                        _write_cache(out, keys[t.label], entry)
                entries.append(entry)
                bar.update()
            if spec.name in bases and model is not None:
                kept[spec.name] = model
            del model
            gc.collect()
    order = {(m.name, t.label): i for i, (m, t) in
             enumerate((m, t) for m in suite.models for t in suite.tasks)}
    entries.sort(key=lambda e: order[(e["model"], e["task"])])
    results = {
        "version": RESULTS_VERSION, "suite": suite.to_dict(), "created": datetime.now(timezone.utc).isoformat(),
        "seconds": time.perf_counter() - started, "environment": environment(),
        "models": [models_info.get(m.name, {"name": m.name}) for m in suite.models], "results": entries,
    }
    _write_reports(results, out)
    return results


def _run_one(task, model: SuiteModel, kept: dict[str, SuiteModel], suite: SuiteConfig, out: Path,
             progress: bool) -> dict:
    base_name = task.params.get("base") or suite.models[0].name
    base = kept.get(base_name) or (model if model.spec.name == base_name else None)
    if base is None and task.task == "agreement":  # its own results were reused: load it now
        try:
            base = kept[base_name] = prepare(suite.model(base_name), out, progress=progress)
        except Exception as e:  # noqa: BLE001
            return {"status": "error", "error": f"base model {base_name}: {_describe(e)}", "seconds": 0.0}
    tokenizer = _tokenizer_for(model, suite, kept)
    t = time.perf_counter()
    try:
        result = run_task(task, model, base=base, tokenizer=tokenizer, progress=progress)
        return {"status": "ok", "result": result, "seconds": time.perf_counter() - t}
    except SkipTask as e:
        return {"status": "skipped", "error": str(e), "seconds": time.perf_counter() - t}
    except Exception as e:  # noqa: BLE001 - recorded; the rest of the suite continues
        return {"status": "error", "error": _describe(e), "seconds": time.perf_counter() - t}


def _tokenizer_for(model: SuiteModel, suite: SuiteConfig, kept: dict[str, SuiteModel]):
    """A URL model's tokenizer: its own `tokenizer`, else the first model's."""
    if model.loaded is not None:
        return model.loaded.tokenizer
    if model.spec.tokenizer:
        return model.spec.tokenizer
    first = suite.models[0]
    if first.name in kept and kept[first.name].loaded is not None:
        return kept[first.name].loaded.tokenizer
    return first.load_source if first.kind != "url" else None


def _describe(e: BaseException) -> str:
    """The error's type and message, and where it came from when it is not a user error."""
    from llmquant.errors import LLMQuantError

    text = f"{type(e).__name__}: {e}"
    if not isinstance(e, LLMQuantError):
        frame = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
        if frame:
            text += f" (at {Path(frame[0].filename).name}:{frame[0].lineno})"
    return text[:2000]


def _read_cache(out: Path, key: str) -> dict | None:
    path = out / "cache" / f"{key}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_cache(out: Path, key: str, entry: dict) -> None:
    _atomic_write(out / "cache" / f"{key}.json", json.dumps(entry, indent=1, default=str))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_reports(results: dict, out: Path) -> None:
    from llmquant.eval.suite.plots import write_plots
    from llmquant.eval.suite.report import markdown_report

    plots = write_plots(results, out / "plots")
    results["plots"] = [str(p.relative_to(out)) for p in plots]
    _atomic_write(out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    _atomic_write(out / "report.md", markdown_report(results))


def environment() -> dict[str, Any]:
    """Versions, machine and threads, for results.json."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from llmquant import __version__
    from llmquant.runtime import describe_device

    versions = {}
    for package in ("transformers", "compressed-tensors", "bitsandbytes", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {"llmquant": __version__, "torch": torch.__version__, **versions, "python": platform.python_version(),
            "platform": platform.platform(), "device": describe_device(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "command": _command()}


def _command() -> str:
    """How this run was started, as a user would type it."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "llmquant":
        argv[0] = "llmquant"
    return " ".join(argv)
