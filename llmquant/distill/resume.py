"""Resumable training checkpoints, without pickle.

A checkpoint folder `step-000120/` (written atomically, so a crash mid-write leaves no folder
that looks complete) holds:
    model.safetensors        the student's parameters in float32 (tied weights once)
    extra.safetensors        trainable modules beside the student (hidden-state projections)
    optimizer.safetensors    every tensor of the optimizer state ("state.<param>.<name>")
    rng.safetensors          torch CPU (and CUDA) generator states
    state.json               step, data position, losses so far, optimizer param groups and
                             non-tensor state, scheduler state, Python's random state, recipe
Resuming restores all of it, so the run continues with the very numbers it would have had.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from llmquant.checkpoint.atomic import PARTIAL_MARK, atomic_directory
from llmquant.errors import InvalidConfigError

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {}
    for param, entries in state_dict["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{param}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(param), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "plain_state": plain}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, param, name = key.split(".", 2)
        state.setdefault(int(param), {})[name] = value
    for param, entries in meta["plain_state"].items():
        state.setdefault(int(param), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, *, model: nn.Module, extra: nn.Module | None, optimizer, scheduler,
                    state: dict) -> Path:
    """Write one resumable checkpoint folder atomically; returns its path."""
    with atomic_directory(folder, overwrite=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        if extra is not None and len(list(extra.parameters())):
            save_file({k: v.detach().cpu().contiguous() for k, v in extra.state_dict().items()},
                      tmp / "extra.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda.{i}"] = s
        save_file(rng, tmp / "rng.safetensors")
        full = {**state, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                "python_random": _jsonable(random.getstate())}
        (tmp / "state.json").write_text(json.dumps(full, indent=1), encoding="utf-8")
    return Path(folder)


def load_checkpoint(folder: Path, *, model: nn.Module, extra: nn.Module | None, optimizer, scheduler) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the trainer state (step, position, ...)."""
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=False)
    if unexpected or [m for m in missing if m not in _tied_names(model)]:
        raise InvalidConfigError(f"The checkpoint {folder} does not match this student (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}); resume with the same recipe and teacher.")
    if extra is not None and (folder / "extra.safetensors").is_file():
        extra.load_state_dict(load_file(folder / "extra.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(load_file(folder / "optimizer.safetensors"), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tuplify(state["python_random"]))
    return state


def latest_checkpoint(directory: Path) -> Path | None:
    """The highest-step complete checkpoint folder under `directory`, if any."""
    if not directory.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _STEP_DIR.match(p.name)) and PARTIAL_MARK not in p.name and (p / "state.json").is_file()]
    return max(steps)[1] if steps else None


def step_folder(directory: Path, step: int) -> Path:
    return directory / f"step-{step:06d}"


def _tied_names(model: nn.Module) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied.keys() if isinstance(tied, dict) else tied)


def _jsonable(obj):
    if isinstance(obj, tuple):
        return {"__tuple__": [_jsonable(x) for x in obj]}
    if isinstance(obj, list):
        return [_jsonable(x) for x in obj]
    return obj


def _tuplify(obj):
    if isinstance(obj, dict) and "__tuple__" in obj:
        return tuple(_tuplify(x) for x in obj["__tuple__"])
    if isinstance(obj, list):
        return [_tuplify(x) for x in obj]
    return obj
