"""Load a compressed-tensors folder into QuantizedLinear modules (never float copies).

The model skeleton is built with parameters on the meta device (no memory, no random init);
matched Linear modules are swapped for empty QuantizedLinear modules; then every tensor of
the checkpoint is assigned by name. MoE experts, fused into 3-D parameters by transformers, are
split into one Linear per expert projection first (`llmquant/arch/experts.py`), as they were when
the model was quantized, and checkpoint names are mapped to the in-memory ones
(`llmquant/arch/registry.py`). A tensor the skeleton doesn't expect, one it expects but the files
lack, or a shape mismatch is a corrupt checkpoint, reported by name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from llmquant.arch.experts import linearize
from llmquant.arch.registry import from_checkpoint_name, model_spec, to_checkpoint_name
from llmquant.checkpoint.ct_config import parse_quantization_config
from llmquant.checkpoint.shard_writer import INDEX_NAME
from llmquant.errors import CorruptCheckpointError
from llmquant.quant.linear import QuantizedLinear
from llmquant.quant.pipeline.targets import best_group, matches, set_submodule



def weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CorruptCheckpointError(f"{index} lists shard(s) that are missing: {', '.join(missing)}.")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CorruptCheckpointError(f"No .safetensors weights in {folder}.")
    return files


def build_skeleton(config: dict, dtype: torch.dtype) -> nn.Module:
    """The model of `config` (config.json's dict) with its parameters on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    hf_config = AutoConfig.for_model(**cfg)
    # Parameters on meta (allocated when the checkpoint's tensors are assigned); buffers such
    # as rotary frequencies are real, computed as usual.
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def swap_quantized_layers(model: nn.Module, quantization_config: dict, dtype: torch.dtype) -> int:
    """Replace the Linear modules the config quantizes with empty QuantizedLinear modules."""
    groups, ignore = parse_quantization_config(quantization_config)
    targets = [list(g.targets) for g in groups]
    spec = model_spec(model)
    count = 0
    for name, module in list(model.named_modules()):
        # The config names layers as the checkpoint does; class targets ("Linear") match either way.
        on_disk = to_checkpoint_name(name, spec)
        if not isinstance(module, nn.Linear) or matches(on_disk, module, ignore):
            continue
        gi = best_group(on_disk, module, targets)
        if gi is None:
            continue
        layer = QuantizedLinear(module.in_features, module.out_features, groups[gi].scheme,
                                bias=module.bias is not None, dtype=dtype, device="meta")
        set_submodule(model, name, layer)
        count += 1
    return count


def quantized_skeleton(folder: Path, config: dict, dtype: torch.dtype) -> nn.Module:
    """The skeleton of a compressed-tensors folder: experts split, QuantizedLinear shells in place."""
    model = build_skeleton(config, dtype)
    linearize(model, model_spec(model).experts)
    if swap_quantized_layers(model, config["quantization_config"], dtype) == 0:
        raise CorruptCheckpointError(f"The quantization_config in {folder}/config.json matches no Linear layer.")
    return model


def load_quantized_model(folder: Path, config: dict, dtype: torch.dtype, device: torch.device) -> nn.Module:
    folder = Path(folder)
    model = quantized_skeleton(folder, config, dtype)
    spec = model_spec(model)
    quantized = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, QuantizedLinear) for b in m._buffers}
    expected = set(model.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for stored in f.keys():
                key = from_checkpoint_name(stored, spec)
                if key not in expected:
                    raise CorruptCheckpointError(
                        f"{path.name} holds tensor {stored!r}, which this model ({config.get('architectures')}) "
                        "with its quantization_config does not have.")
                t = f.get_tensor(stored)
                # Quantized buffers keep their stored dtype; float weights take the compute dtype.
                state[key] = t if key in quantized or not t.is_floating_point() else t.to(dtype)
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise CorruptCheckpointError(f"Tensors in {folder} do not fit the model: {e}") from None
    model.tie_weights()
    missing = [to_checkpoint_name(n, spec) for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if t.is_meta]
    if missing:
        raise CorruptCheckpointError(
            f"{folder} lacks {len(missing)} tensor(s) the model needs, e.g. {', '.join(missing[:3])}.")
    load_generation_config(model, folder)
    return model.to(device).eval()


def load_generation_config(model: nn.Module, folder: Path) -> None:
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
