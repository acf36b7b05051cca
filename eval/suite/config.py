"""A suite file: which models, which tasks. The YAML file and these objects are the same thing.

    name: demo
    output_note: optional text shown at the top of the report
    models:
      - name: bf16                    # a label for tables and plots
        source: demo                  # any source load_model takes: Hub id, folder, .gguf, demo
      - name: W4A16
        source: demo
        quantize: {scheme: W4A16, group_size: 64}   # llmquant.quantize arguments; cached under OUTPUT/models/
      - name: bnb-nf4
        source: demo
        bitsandbytes: nf4             # int8 (LLM.int8) or nf4, loaded through transformers
      - name: served
        url: http://127.0.0.1:8000/v1 # any OpenAI-compatible server
        served_model: out             # the model name it serves (default: the first it lists)
        api_key_env: MY_KEY           # the environment variable holding its key (never the key itself)
        tokenizer: out/               # its tokenizer (default: the first model's source)
        tasks: [perplexity, load]     # only these tasks for this model (default: all)
    tasks:
      - {task: perplexity, max_tokens: 8192, window: 1024}
      - {task: agreement, max_tokens: 4096}          # KL and top-1 vs `base` (default: the first model)
      - {task: throughput, prefill_lengths: [128, 512, 2048], batch_sizes: [1, 8, 32]}
      - {task: load, concurrency: [1, 4, 8], num_prompts: 16, input_len: 128, output_len: 32}

Unknown keys are rejected with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmquant.config.args import reject_unknown_keys
from llmquant.data.eval_data import EvalData
from llmquant.errors import InvalidConfigError

TASK_KEYS: dict[str, tuple[str, ...]] = {
    # The text and windows; each model's loading options come from its own entry.
    "perplexity": EvalData.DATA_KEYS,
    "agreement": (*EvalData.DATA_KEYS, "base"),
    "throughput": ("prefill_lengths", "batch_sizes", "decode_tokens", "prompt_tokens"),
    "load": ("concurrency", "request_rate", "num_prompts", "input_len", "output_len", "prompts", "seed",
             "max_batch_size"),
}
BITSANDBYTES_MODES = ("int8", "nf4")
# llmquant.quantize arguments a suite may set; the suite owns output, device and progress.
_QUANTIZE_EXCLUDED = {"model", "output", "overwrite", "progress", "dtype", "device", "allow_pickle",
                      "trust_remote_code", "revision"}


def quantize_keys() -> tuple[str, ...]:
    from llmquant.config.flags import FLAGS_BY_NAME  # every keyword llmquant.quantize accepts

    return tuple(n for n in FLAGS_BY_NAME if n not in _QUANTIZE_EXCLUDED)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str | None = None  # None or "demo": the built-in demo model
    quantize: dict[str, Any] | None = None
    bitsandbytes: str | None = None
    url: str | None = None
    served_model: str | None = None
    api_key_env: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str | None = None
    tasks: tuple[str, ...] | None = None  # only these tasks (labels) for this model; None: all

    def __post_init__(self) -> None:
        if self.tasks is not None:
            if not isinstance(self.tasks, (list, tuple)) or not all(isinstance(t, str) for t in self.tasks):
                raise InvalidConfigError(f"model {self.name}: tasks must be a list of task names.")
            object.__setattr__(self, "tasks", tuple(self.tasks))
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise InvalidConfigError(f"model name must be a non-empty label without '/', got {self.name!r}.")
        kinds = [k for k in ("quantize", "bitsandbytes", "url") if getattr(self, k) is not None]
        if len(kinds) > 1:
            raise InvalidConfigError(f"model {self.name}: {' and '.join(kinds)} cannot be combined; choose one.")
        if self.url is not None and self.source is not None:
            raise InvalidConfigError(f"model {self.name}: give either url (a server) or source (a local model).")
        if self.bitsandbytes is not None and self.bitsandbytes not in BITSANDBYTES_MODES:
            raise InvalidConfigError(f"model {self.name}: bitsandbytes must be one of {', '.join(BITSANDBYTES_MODES)}, "
                                     f"got {self.bitsandbytes!r}.")
        if self.quantize is not None:
            if not isinstance(self.quantize, dict):
                raise InvalidConfigError(f"model {self.name}: quantize must be a mapping such as {{scheme: W8A8}}.")
            reject_unknown_keys(self.quantize, quantize_keys(), f"model {self.name} quantize")

    @property
    def kind(self) -> str:
        if self.url is not None:
            return "url"
        if self.quantize is not None:
            return "quantize"
        if self.bitsandbytes is not None:
            return "bitsandbytes"
        return "source"

    @property
    def load_source(self) -> str | None:
        """The source for load_model (None: the demo model)."""
        return None if self.source in (None, "demo") else self.source

    @classmethod
    def from_dict(cls, data: Any) -> "ModelSpec":
        if not isinstance(data, dict):
            raise InvalidConfigError(f"each model must be a mapping with at least a name, got {data!r}.")
        reject_unknown_keys(data, {f.name for f in dataclasses.fields(cls)}, f"model {data.get('name', '?')}")
        if "name" not in data:
            raise InvalidConfigError("every model needs a name (a label for tables and plots).")
        return cls(**data)


@dataclass(frozen=True)
class TaskSpec:
    task: str
    params: dict[str, Any] = field(default_factory=dict)
    name: str | None = None  # defaults to the task type; set it to run one type twice

    @property
    def label(self) -> str:
        return self.name or self.task

    @classmethod
    def from_dict(cls, data: Any) -> "TaskSpec":
        if not isinstance(data, dict) or "task" not in data:
            raise InvalidConfigError(f"each task must be a mapping with a 'task' key ({', '.join(TASK_KEYS)}), "
                                     f"got {data!r}.")
        task = data["task"]
        if task not in TASK_KEYS:
            raise InvalidConfigError(f"Unknown task {task!r}; valid tasks: {', '.join(TASK_KEYS)}.")
        params = {k: v for k, v in data.items() if k not in ("task", "name")}
        reject_unknown_keys(params, TASK_KEYS[task], f"task {task}")
        if task in ("perplexity", "agreement"):
            try:  # a wrong type or an impossible window fails when the suite is read, not mid-run
                EvalData.build(**{k: v for k, v in params.items() if k in EvalData.DATA_KEYS})
            except InvalidConfigError as e:
                raise InvalidConfigError(f"task {data.get('name') or task}: {e}") from None
        return cls(task=task, params=params, name=data.get("name"))


@dataclass(frozen=True)
class SuiteConfig:
    name: str
    models: tuple[ModelSpec, ...]
    tasks: tuple[TaskSpec, ...]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.models or not self.tasks:
            raise InvalidConfigError(f"suite {self.name}: needs at least one model and one task.")
        for what, labels in (("model", [m.name for m in self.models]), ("task", [t.label for t in self.tasks])):
            duplicates = sorted({x for x in labels if labels.count(x) > 1})
            if duplicates:
                raise InvalidConfigError(f"suite {self.name}: {what} names must be unique; repeated: "
                                         f"{', '.join(duplicates)} (give tasks of one type a 'name').")
        names = {m.name for m in self.models}
        labels = {t.label for t in self.tasks}
        for m in self.models:
            unknown = sorted(set(m.tasks or ()) - labels)
            if unknown:
                raise InvalidConfigError(f"model {m.name}: tasks {', '.join(unknown)} are not tasks of this suite "
                                         f"({', '.join(sorted(labels))}).")
        for t in self.tasks:
            base = t.params.get("base")
            if base is not None and base not in names:
                raise InvalidConfigError(f"task {t.label}: base {base!r} is not a model of this suite "
                                         f"({', '.join(sorted(names))}).")

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    @classmethod
    def from_dict(cls, data: Any, default_name: str = "suite") -> "SuiteConfig":
        if not isinstance(data, dict):
            raise InvalidConfigError("a suite file must be a mapping with 'models' and 'tasks'.")
        reject_unknown_keys(data, ("name", "description", "models", "tasks"), "the suite")
        models, tasks = data.get("models"), data.get("tasks")
        if not isinstance(models, list) or not isinstance(tasks, list):
            raise InvalidConfigError("a suite needs a list of models and a list of tasks.")
        return cls(name=str(data.get("name") or default_name), description=str(data.get("description") or ""),
                   models=tuple(ModelSpec.from_dict(m) for m in models),
                   tasks=tuple(TaskSpec.from_dict(t) for t in tasks))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SuiteConfig":
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise InvalidConfigError(f"Cannot read the suite file {p}: {e.strerror}.") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InvalidConfigError(f"{p} is not valid YAML: {e}") from None
        return cls.from_dict(data, default_name=p.stem)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "models": [{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(m).items()
                            if v is not None} for m in self.models],
                "tasks": [{"task": t.task, **({"name": t.name} if t.name else {}), **t.params} for t in self.tasks]}
