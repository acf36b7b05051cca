"""Resume points for layer-by-layer quantization: an interrupted run continues at the layer it reached.

After each decoder layer, the folder `<output>.resume/` receives that layer's quantized tensors
(`layer-<k>.safetensors`), the next layer's inputs (`inputs.safetensors`) and `state.json`
(the next layer, the recipe, the layer reports). Each file is written to a temporary name and
renamed, and state.json last, so the folder always describes a consistent point. A resumed run
checks that the recipe and the calibration shape are the same, rebuilds the finished layers
from their tensors and continues; the folder is removed once the checkpoint is saved.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmquant.errors import InvalidConfigError
from llmquant.quant.linear import QuantizedLinear
from llmquant.quant.pipeline.report import LayerReport
from llmquant.quant.pipeline.sequential import LayerInputs
from llmquant.quant.pipeline.targets import set_submodule

STATE = "state.json"
INPUTS = "inputs.safetensors"


def resume_dir(output: str | os.PathLike) -> Path:
    out = Path(output).expanduser().absolute()
    return out.with_name(out.name + ".resume")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class ResumeWriter:
    """Saves a resume point after each finished layer."""

    def __init__(self, folder: Path, key: dict, reports: dict[str, LayerReport]):
        self.folder, self.key, self.reports = folder, key, reports
        folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, k: int, prefix: str, layer: nn.Module, inputs: LayerInputs) -> None:
        tensors = {f"{prefix}.{name}.{b}": buf.detach().cpu().contiguous()
                   for name, mod in layer.named_modules() if isinstance(mod, QuantizedLinear)
                   for b, buf in list(mod.named_buffers(recurse=False)) + list(mod.named_parameters(recurse=False))}
        _atomic(self.folder / f"layer-{k}.safetensors", lambda p: save_file(tensors, str(p)))
        hidden = {f"batch-{i}": h.detach().cpu().contiguous() for i, h in enumerate(inputs.hidden_states())}
        _atomic(self.folder / INPUTS, lambda p: save_file(hidden, str(p)))
        state = {"next_layer": k + 1, "key": self.key,
                 "reports": {n: dataclasses.asdict(r) for n, r in self.reports.items()}}
        _atomic(self.folder / STATE, lambda p: p.write_text(json.dumps(state), encoding="utf-8"))


def load_resume_point(folder: Path, key: dict) -> dict | None:
    """The saved state, or None when there is none; refuses one made with other settings."""
    path = folder / STATE
    if not path.is_file():
        return None
    state = json.loads(path.read_text(encoding="utf-8"))
    if state.get("key") != key:
        raise InvalidConfigError(f"The resume point in {folder} was made with other settings (recipe, model or "
                                 "calibration); delete that folder or run without --resume.")
    return state


def restore(net: nn.Module, folder: Path, state: dict, plans: dict, scale_dtype_for, inputs: LayerInputs
            ) -> tuple[int, dict[str, LayerReport]]:
    """Put the finished layers' quantized modules back into `net` and their outputs into `inputs`."""
    next_layer = state["next_layer"]
    for k in range(next_layer):
        tensors = load_file(str(folder / f"layer-{k}.safetensors"))
        names = sorted({key.rsplit(".", 1)[0] for key in tensors})
        for name in names:
            plan = plans[name]
            module, scheme = plan.module, plan.scheme
            q = QuantizedLinear(module.in_features, module.out_features, scheme, bias=module.bias is not None,
                                scale_dtype=scale_dtype_for(scheme), dtype=module.weight.dtype,
                                device=module.weight.device)
            own = {key[len(name) + 1:]: t for key, t in tensors.items() if key.rsplit(".", 1)[0] == name}
            for b, t in own.items():
                if b == "bias":
                    q.bias.data.copy_(t)
                else:
                    setattr(q, b, t.to(module.weight.device))
            set_submodule(net, name, q)
            plan.module = None
    saved = load_file(str(folder / INPUTS))
    device = next(net.parameters()).device
    for i, (args, kwargs) in enumerate(inputs.calls):
        inputs.calls[i] = ((saved[f"batch-{i}"].to(device),) + tuple(args[1:]), kwargs)
    reports = {n: LayerReport(**r) for n, r in state["reports"].items()}
    return next_layer, reports


def discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def resume_key(recipe_dict: dict, source: str, batches: torch.Tensor) -> dict:
    """What must match for a resume point to be reused: recipe, model and the exact calibration tokens."""
    import hashlib

    digest = hashlib.sha256(batches.cpu().numpy().tobytes()).hexdigest()[:16]
    return {"recipe": recipe_dict, "source": source, "calibration": [list(batches.shape), digest]}


class StreamResume:
    """Resume points of a streamed run (pipeline/streamed.py). After each decoder layer the folder
    receives the layer's tensors as written to the checkpoint (`layer-<k>.safetensors`, so a resumed
    run writes them again without reading or computing that layer), every stream of hidden states
    (`inputs.safetensors`) and `state.json` last."""

    def __init__(self, folder: Path, key: dict, layer_reports: dict[str, LayerReport], resume: bool):
        self.folder, self.key, self.layer_reports = folder, {**key, "streamed": True}, layer_reports
        self.state = load_resume_point(folder, self.key) if resume else None
        if self.state is None:
            discard(folder)
        folder.mkdir(parents=True, exist_ok=True)

    def restore(self, streams, writer, handler) -> int:
        """Write the finished layers again, restore the streams and reports; the next layer's index."""
        if self.state is None:
            return 0
        next_layer = self.state["next_layer"]
        for k in range(next_layer):
            tensors = load_file(str(self.folder / f"layer-{k}.safetensors"))
            writer.add({name: tensors[name] for name in self.state["order"][k]})
        saved = load_file(str(self.folder / INPUTS))
        for name, inputs in streams.named().items():
            for i, (args, kwargs) in enumerate(inputs.calls):
                hidden = saved[f"{name}-{i}"].to(args[0].device)
                inputs.calls[i] = ((hidden,) + tuple(args[1:]), kwargs)
        streams.tuple_outputs = self.state["tuple_outputs"]
        reports = {n: LayerReport(**r) for n, r in self.state["reports"].items()}
        self.layer_reports.update(reports)
        if handler is not None:
            handler.reports.update(reports)
        return next_layer

    def save(self, k: int, tensors: dict[str, torch.Tensor], streams, handler) -> None:
        _atomic(self.folder / f"layer-{k}.safetensors", lambda p: save_file(tensors, str(p)))
        hidden = {f"{name}-{i}": h.detach().cpu().contiguous()
                  for name, inputs in streams.named().items() for i, h in enumerate(inputs.hidden_states())}
        _atomic(self.folder / INPUTS, lambda p: save_file(hidden, str(p)))
        order = (self.state or {}).get("order", [])[:k] + [list(tensors)]
        self.state = {"next_layer": k + 1, "key": self.key, "order": order, "tuple_outputs": streams.tuple_outputs,
                      "reports": {n: dataclasses.asdict(r) for n, r in
                                  {**self.layer_reports, **(handler.reports if handler else {})}.items()}}
        _atomic(self.folder / STATE, lambda p: p.write_text(json.dumps(self.state), encoding="utf-8"))
