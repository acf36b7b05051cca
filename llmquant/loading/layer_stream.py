"""A model whose weights stay on disk until a module is asked for: the basis of streamed runs.

The model is built with its parameters on the meta device (no memory); `load(name)` reads that
module's tensors from the checkpoint's safetensors files (only those tensors, each file opened
for the call and closed after it, so no mapping outlives the call), casts them as loading the
whole model would and moves them to the device; `release(name)` puts them back on meta. A
quantize run that loads one decoder layer, works on it and releases it holds one layer's
weights at a time, whatever the depth of the model.

Float checkpoints and our own compressed-tensors folders both stream: for the latter the Linear
layers the quantization_config covers are QuantizedLinear shells, and their quantized buffers keep
the dtype they were stored in (what `load_quantized_model` does). Names are mapped to the
checkpoint's spelling (llmquant/arch/registry.py), tied weights read their source tensor, and a
tensor the model needs that the files lack is refused before anything runs.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from llmquant.arch.registry import model_spec, to_checkpoint_name
from llmquant.errors import CorruptCheckpointError
from llmquant.memory import release_freed_memory
from llmquant.quant.linear import QuantizedLinear

_SHOWN = 3


class LayerStream:
    """Reads the tensors of one module at a time into `model` (see the module docstring)."""

    def __init__(self, folder: Path, model: nn.Module, device: torch.device):
        from llmquant.checkpoint.load import weight_files

        self.folder, self.model, self.device = Path(folder), model, torch.device(device)
        self.spec = model_spec(model)
        self.location: dict[str, Path] = {}  # checkpoint name -> file
        self.shapes: dict[str, list[int]] = {}
        for path in weight_files(self.folder):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    self.location[name] = path
                    self.shapes[name] = list(f.get_slice(name).get_shape())
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        self.tied: dict[str, str] = dict(tied) if isinstance(tied, dict) else {}
        self._check_complete()
        # Buffers computed at construction (rotary frequencies) are real; they go to the device now.
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and not buf.is_meta:
                    module._buffers[name] = buf.to(self.device)

    def checkpoint_name(self, key: str) -> str:
        """The name under which the files hold the model's tensor `key`."""
        name = to_checkpoint_name(key, self.spec)
        if name in self.location:
            return name
        if key in self.tied and self.tied[key] != key:
            return self.checkpoint_name(self.tied[key])
        raise KeyError(key)

    def _check_complete(self) -> None:
        missing, mismatched = [], []
        for key, tensor in self.model.state_dict(keep_vars=True).items():
            try:
                name = self.checkpoint_name(key)
            except KeyError:
                missing.append(to_checkpoint_name(key, self.spec))
                continue
            if not isinstance(self._owner(key)[0], QuantizedLinear) and self.shapes[name] != list(tensor.shape):
                mismatched.append(f"{name} {self.shapes[name]} (the model needs {list(tensor.shape)})")
        if missing:
            raise CorruptCheckpointError(
                f"{self.folder} lacks {len(missing)} tensor(s) the model needs, e.g. {', '.join(missing[:_SHOWN])}. "
                "A checkpoint whose tensors transformers converts while loading (fused experts) cannot be read "
                "a layer at a time; quantize it with --no-stream.")
        if mismatched:
            raise CorruptCheckpointError(f"Tensors in {self.folder} do not match config.json: "
                                         f"{'; '.join(mismatched[:_SHOWN])}.")

    def _owner(self, key: str) -> tuple[nn.Module, str]:
        module_name, _, attr = key.rpartition(".")
        return (self.model.get_submodule(module_name) if module_name else self.model), attr

    def keys(self, prefix: str) -> list[str]:
        """The model's state-dict keys under module `prefix` ("" for all), in state-dict order."""
        module = self.model.get_submodule(prefix) if prefix else self.model
        dot = f"{prefix}." if prefix else ""
        return [dot + k for k in module.state_dict(keep_vars=True)]

    def outside_keys(self, stack: str) -> tuple[list[str], list[str]]:
        """The state-dict keys outside the decoder stack `stack` (e.g. "model.layers"): those before
        it (embeddings) and those after it (final norm, output head), in state-dict order."""
        keys = self.keys("")
        inside = [i for i, k in enumerate(keys) if k.startswith(stack + ".")]
        first = inside[0] if inside else len(keys)
        return ([k for k in keys[:first] if not k.startswith(stack + ".")],
                [k for k in keys[first:] if not k.startswith(stack + ".")])

    def load(self, prefix: str, keys: list[str] | None = None) -> None:
        """Read the tensors of module `prefix` (or just `keys`) from the files onto the device."""
        keys = self.keys(prefix) if keys is None else keys
        by_file: dict[Path, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.location[self.checkpoint_name(key)]].append(key)
        for path, file_keys in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in file_keys:
                    self._assign(key, f.get_tensor(self.checkpoint_name(key)))

    def _assign(self, key: str, tensor: torch.Tensor) -> None:
        owner, attr = self._owner(key)
        slot = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
        if isinstance(owner, QuantizedLinear) and attr in owner._buffers:
            pass  # quantized tensors and their scales keep the dtype they were stored in
        elif tensor.is_floating_point() and slot is not None:
            tensor = tensor.to(slot.dtype)  # the dtype loading the whole model would give it
        tensor = tensor.to(self.device)
        if attr in owner._parameters:
            requires_grad = slot.requires_grad if slot is not None else False
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=requires_grad and tensor.is_floating_point())
        else:
            owner._buffers[attr] = tensor

    def release(self, prefix: str, keys: list[str] | None = None) -> None:
        """Put the tensors of module `prefix` (or just `keys`) back on the meta device."""
        for key in self.keys(prefix) if keys is None else keys:
            owner, attr = self._owner(key)
            release_tensor(owner, attr)
        module = self.model.get_submodule(prefix) if prefix else self.model
        clear_kernel_caches(module)
        release_freed_memory()


def release_tensor(owner: nn.Module, attr: str) -> None:
    """Replace one parameter or buffer by an empty meta tensor of the same shape and dtype."""
    if attr in owner._parameters and owner._parameters[attr] is not None:
        p = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    elif attr in owner._buffers and owner._buffers[attr] is not None:
        owner._buffers[attr] = torch.empty_like(owner._buffers[attr], device="meta")


def release_module(module: nn.Module) -> None:
    """Every parameter and persistent buffer of `module` back on meta (a module no longer in the model)."""
    for name in list(module.state_dict(keep_vars=True)):
        owner_name, _, attr = name.rpartition(".")
        release_tensor(module.get_submodule(owner_name) if owner_name else module, attr)
    clear_kernel_caches(module)


def clear_kernel_caches(module: nn.Module) -> None:
    # QuantizedLinear keeps kernel-specific copies of its packed weights; they go with the weights.
    for m in module.modules():
        cache = getattr(m, "kernel_cache", None)
        if isinstance(cache, dict):
            cache.clear()
