"""Run one task of a suite on one model; the result is a JSON-ready dict.

Local models are measured in this process; a URL model through its server; a local model's
`load` task through `llmquant serve` started in a child process on a free port (stopped after).
"""

from __future__ import annotations

from typing import Any

from llmquant.data.eval_data import EvalData
from llmquant.eval.suite.config import TaskSpec
from llmquant.eval.suite.models import SuiteModel, api_key


class SkipTask(Exception):
    """The task does not apply to this model (said why); not a failure."""


def run_task(task: TaskSpec, model: SuiteModel, *, base: SuiteModel | None, tokenizer: Any,
             progress: bool = True) -> dict[str, Any]:
    runner = {"perplexity": _perplexity, "agreement": _agreement, "throughput": _throughput, "load": _load}[task.task]
    return runner(dict(task.params), model, base=base, tokenizer=tokenizer, progress=progress)


def _perplexity(params: dict, model: SuiteModel, *, base, tokenizer, progress: bool) -> dict:
    data = EvalData.build(**params)
    if model.spec.kind == "url":
        from llmquant.eval.remote import remote_perplexity

        return remote_perplexity(model.spec.url, model.spec.served_model, data, api_key=api_key(model.spec),
                                 tokenizer=tokenizer, progress=progress).to_dict()
    from llmquant.eval import perplexity

    return perplexity(model.loaded, data, progress=progress).to_dict()


def _agreement(params: dict, model: SuiteModel, *, base, tokenizer, progress: bool) -> dict:
    params.pop("base", None)
    if base is None or base.spec.name == model.spec.name:
        raise SkipTask("this is the base model the others are compared with")
    if base.loaded is None:
        raise SkipTask(f"the base model {base.spec.name} is not a local model; agreement needs its logits")
    data = EvalData.build(**params)
    if model.spec.kind == "url":
        from llmquant.eval.remote import remote_perplexity

        result = remote_perplexity(model.spec.url, model.spec.served_model, data, api_key=api_key(model.spec),
                                   tokenizer=tokenizer, base=base.loaded, progress=progress).to_dict()
        result["kl_mean"] = None  # not measurable over HTTP (see eval.remote)
        return result
    from llmquant.eval.agreement import agreement

    return agreement(model.loaded, base.loaded, data, progress=progress).to_dict()


def _throughput(params: dict, model: SuiteModel, *, base, tokenizer, progress: bool) -> dict:
    if model.spec.kind == "url":
        raise SkipTask("offline throughput runs our engine on a local model; use the load task for a server")
    from llmquant.eval.throughput import offline_throughput

    result = offline_throughput(model.loaded, progress=progress, **_tuples(params)).to_dict()
    result["load_seconds"] = model.load_seconds
    result["checkpoint_bytes"] = model.size_bytes
    result["size_kind"] = model.size_kind
    # Other suite models (a base kept for agreement) share this process: the peak above the
    # memory before this model was loaded is what this model and the run added.
    if result.get("peak_rss_bytes") and model.rss_before_load:
        result["peak_rss_over_baseline_bytes"] = result["peak_rss_bytes"] - model.rss_before_load
    return result


def _load(params: dict, model: SuiteModel, *, base, tokenizer, progress: bool) -> dict:
    from llmquant.eval.loadgen import load_test

    concurrencies = _as_list(params.pop("concurrency", [1]))
    rates = _as_list(params.pop("request_rate", [None]))
    max_batch_size = params.pop("max_batch_size", None)
    if model.spec.kind == "url":
        return {"runs": _sweep(load_test, model.spec.url, model.spec.served_model, api_key(model.spec), tokenizer,
                               concurrencies, rates, params, progress)}
    if model.folder is None:
        raise SkipTask("llmquant serve cannot load this model (bitsandbytes baselines are measured offline only)")
    from llmquant.eval.server_process import ServerProcess

    args = ["--dtype", model.spec.dtype, "--served-model-name", model.spec.name]
    if model.spec.device:
        args += ["--device", model.spec.device]
    if max_batch_size:
        args += ["--max-batch-size", str(max_batch_size)]
    with ServerProcess(model.folder, *args) as server:
        runs = _sweep(load_test, server.base_url, model.spec.name, None, model.loaded.tokenizer, concurrencies,
                      rates, params, progress)
    return {"runs": runs, "server": "llmquant serve " + " ".join([str(model.folder), *args])}


def _sweep(load_test, url, served_model, key, tokenizer, concurrencies, rates, params, progress) -> list[dict]:
    runs = []
    for rate in rates:
        for concurrency in concurrencies:
            runs.append(load_test(url, served_model, api_key=key, tokenizer=tokenizer, concurrency=concurrency,
                                  request_rate=rate, progress=progress, **params).to_dict())
    return runs


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _tuples(params: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
