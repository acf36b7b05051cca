"""Make a student from a teacher: drop decoder layers, prune MLP neurons and KV groups, or
build one from a config. The result is an ordinary transformers model (its config says what it
is), so it saves, loads and serves like any checkpoint.

Which parts go is measured on calibration text:
- a decoder layer's importance is 1 - cos(input, output) of its hidden states, averaged over
  tokens: a layer that barely turns the residual stream can go (Gromov et al., "The
  Unreasonable Ineffectiveness of the Deeper Layers"; Men et al., ShortGPT's Block Influence);
- an MLP neuron's importance is the mean |act(gate) * up| it feeds into down_proj, and a KV
  group's the mean L2 norm of its query heads' outputs entering o_proj (Minitron's activation
  criteria). Every layer keeps the same number (the config is uniform) but chooses which.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llmquant.errors import InvalidConfigError

_ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclass
class StudentPlan:
    """What was measured and what was kept (in the student folder's distill_report.json)."""

    teacher_layers: int
    kept_layers: list[int]
    layer_importance: list[float] | None = None
    intermediate_size: tuple[int, int] | None = None  # (teacher, student)
    kv_heads: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"teacher_layers": self.teacher_layers, "kept_layers": self.kept_layers,
                "dropped_layers": [i for i in range(self.teacher_layers) if i not in self.kept_layers],
                "layer_importance": self.layer_importance, "intermediate_size": self.intermediate_size,
                "kv_heads": self.kv_heads, "notes": self.notes}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise InvalidConfigError(
            f"{type(model).__name__} does not keep its decoder layers at model.layers (as Llama, Qwen2, "
            "Mistral and Gemma do); layer dropping and width pruning need that layout.")
    return layers


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def layer_importance(model: nn.Module, batches: Tensor) -> list[float]:
    """Per decoder layer: mean over calibration tokens of 1 - cos(hidden in, hidden out)."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0

    def hook(index):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
            sums[index] += (1.0 - cos).sum().double().cpu()
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        device = _model_device(model)
        for row in batches:
            model(row[None].to(device), use_cache=False)
            count += row.numel()
    finally:
        for h in handles:
            h.remove()
    return (sums / max(count, 1)).tolist()


def choose_layers(importance: list[float], keep: int) -> list[int]:
    """The `keep` most important layers, in their original order."""
    n = len(importance)
    if not 1 <= keep <= n:
        raise InvalidConfigError(f"Cannot keep {keep} of {n} decoder layers; choose 1..{n}.")
    order = sorted(range(n), key=lambda i: importance[i], reverse=True)
    return sorted(order[:keep])


def drop_layers(model: nn.Module, keep: list[int]) -> None:
    """Keep only the decoder layers `keep` (in place) and make the config agree."""
    layers = decoder_layers(model)
    n = len(layers)
    if not keep or sorted(set(keep)) != sorted(keep) or min(keep) < 0 or max(keep) >= n:
        raise InvalidConfigError(f"Layers to keep must be distinct indices in 0..{n - 1}, got {keep}.")
    kept = [layers[i] for i in sorted(keep)]
    for new_index, layer in enumerate(kept):
        # The KV cache is indexed by layer_idx: it must be the layer's new position.
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_index
    model.model.layers = nn.ModuleList(kept)
    config = model.config
    config.num_hidden_layers = len(kept)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        config.layer_types = [layer_types[i] for i in sorted(keep)]


def _require(module: nn.Module, names: tuple[str, ...], what: str) -> list[nn.Linear]:
    found = [getattr(module, n, None) for n in names]
    if not all(isinstance(f, nn.Linear) for f in found):
        raise InvalidConfigError(f"Width pruning of {what} needs Llama-style {', '.join(names)} Linear layers; "
                                 f"{type(module).__name__} has other ones.")
    return found


def _slice_linear(linear: nn.Linear, out_idx: Tensor | None = None, in_idx: Tensor | None = None) -> nn.Linear:
    w = linear.weight.data
    if out_idx is not None:
        w = w.index_select(0, out_idx)
    if in_idx is not None:
        w = w.index_select(1, in_idx)
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if linear.bias is not None:
        b = linear.bias.data if out_idx is None else linear.bias.data.index_select(0, out_idx)
        new.bias.data.copy_(b)
    return new


@torch.no_grad()
def width_importance(model: nn.Module, batches: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer: mean |input of down_proj| per neuron (I,), and mean per-head L2 norm of the
    input of o_proj (heads,)."""
    layers = decoder_layers(model)
    neuron = [None] * len(layers)
    heads = [None] * len(layers)
    head_dim = _head_dim(model.config)

    def mlp_hook(i):
        def fn(module, args):
            a = args[0].detach().float().abs().reshape(-1, args[0].shape[-1]).sum(0).cpu()
            neuron[i] = a if neuron[i] is None else neuron[i] + a
        return fn

    def attn_hook(i):
        def fn(module, args):
            x = args[0].detach().float()
            per_head = x.reshape(*x.shape[:-1], -1, head_dim).norm(dim=-1).reshape(-1, x.shape[-1] // head_dim)
            s = per_head.sum(0).cpu()
            heads[i] = s if heads[i] is None else heads[i] + s
        return fn

    handles = []
    for i, layer in enumerate(layers):
        _, _, down = _require(layer.mlp, _MLP_NAMES, "MLP neurons")
        _, _, _, o = _require(layer.self_attn, _ATTN_NAMES, "attention heads")
        handles.append(down.register_forward_pre_hook(mlp_hook(i)))
        handles.append(o.register_forward_pre_hook(attn_hook(i)))
    try:
        device = _model_device(model)
        for row in batches:
            model(row[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return neuron, heads


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def prune_mlp(model: nn.Module, neuron_scores: list[Tensor], keep: int) -> None:
    """Keep the `keep` highest-scoring MLP neurons of every layer (gate/up rows, down columns)."""
    full = model.config.intermediate_size
    if not 1 <= keep <= full:
        raise InvalidConfigError(f"intermediate_size must be in 1..{full}, got {keep}.")
    for layer, scores in zip(decoder_layers(model), neuron_scores):
        idx = torch.sort(torch.topk(scores, keep).indices).values.to(layer.mlp.down_proj.weight.device)
        gate, up, down = _require(layer.mlp, _MLP_NAMES, "MLP neurons")
        layer.mlp.gate_proj = _slice_linear(gate, out_idx=idx)
        layer.mlp.up_proj = _slice_linear(up, out_idx=idx)
        layer.mlp.down_proj = _slice_linear(down, in_idx=idx)
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = keep
    model.config.intermediate_size = keep


def prune_kv_groups(model: nn.Module, head_scores: list[Tensor], keep: int) -> None:
    """Keep the `keep` highest-scoring KV groups of every layer, each with all its query heads,
    so the grouped-query ratio (and the head size) stays the same."""
    config = model.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    if not 1 <= keep <= n_kv:
        raise InvalidConfigError(f"num_key_value_heads must be in 1..{n_kv}, got {keep}.")
    group = n_heads // n_kv
    hd = _head_dim(config)
    for layer, scores in zip(decoder_layers(model), head_scores):
        attn = layer.self_attn
        q, k, v, o = _require(attn, _ATTN_NAMES, "attention heads")
        group_scores = scores.reshape(n_kv, group).sum(-1)
        kv_idx = torch.sort(torch.topk(group_scores, keep).indices).values
        q_heads = (kv_idx[:, None] * group + torch.arange(group)).reshape(-1)
        dev = q.weight.device
        q_rows = (q_heads[:, None] * hd + torch.arange(hd)).reshape(-1).to(dev)
        kv_rows = (kv_idx[:, None] * hd + torch.arange(hd)).reshape(-1).to(dev)
        attn.q_proj = _slice_linear(q, out_idx=q_rows)
        attn.k_proj = _slice_linear(k, out_idx=kv_rows)
        attn.v_proj = _slice_linear(v, out_idx=kv_rows)
        attn.o_proj = _slice_linear(o, in_idx=q_rows)
        for name, value in (("num_heads", keep * group), ("num_key_value_heads", keep)):
            if hasattr(attn, name):
                setattr(attn, name, value)
    config.num_attention_heads = keep * group
    config.num_key_value_heads = keep
    config.head_dim = hd  # hidden_size // heads no longer gives it


def make_student(teacher: nn.Module, batches: Tensor | None, *, num_layers: int | None = None,
                 keep_layers: list[int] | None = None, intermediate_size: int | None = None,
                 num_key_value_heads: int | None = None) -> tuple[nn.Module, StudentPlan]:
    """A pruned copy of `teacher` (which is left untouched), and what was measured and kept.

    num_layers: keep that many decoder layers, the most important on `batches`;
    keep_layers: or exactly these indices. intermediate_size / num_key_value_heads: prune MLP
    neurons / KV groups (with their query heads) to that many per layer, by activation
    magnitude on `batches` (measured after the layers are dropped).
    """
    if num_layers is not None and keep_layers is not None:
        raise InvalidConfigError("Give the number of layers to keep or the list of layers, not both.")
    student = copy.deepcopy(teacher).requires_grad_(True)  # a frozen teacher still gives a trainable student
    n = len(decoder_layers(student))
    plan = StudentPlan(teacher_layers=n, kept_layers=list(range(n)))
    needs_data = num_layers is not None or intermediate_size is not None or num_key_value_heads is not None
    if needs_data and batches is None:
        raise InvalidConfigError("Choosing what to prune needs calibration text (batches).")
    was_training = student.training
    student.eval()
    if num_layers is not None:
        plan.layer_importance = layer_importance(student, batches)
        keep_layers = choose_layers(plan.layer_importance, num_layers)
    if keep_layers is not None:
        drop_layers(student, list(keep_layers))
        plan.kept_layers = sorted(keep_layers)
    if intermediate_size is not None or num_key_value_heads is not None:
        neurons, heads = width_importance(student, batches)
        if intermediate_size is not None:
            plan.intermediate_size = (student.config.intermediate_size, intermediate_size)
            prune_mlp(student, neurons, intermediate_size)
        if num_key_value_heads is not None:
            plan.kv_heads = (student.config.num_key_value_heads, num_key_value_heads)
            prune_kv_groups(student, heads, num_key_value_heads)
    student.train(was_training)
    return student, plan


def student_from_config(config_path, teacher_tokenizer, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A freshly initialized model of any causal-LM architecture (a config.json, a YAML file of
    the same keys, or a folder holding a config.json) that uses the teacher's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = read_student_config(config_path)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise InvalidConfigError(f"{config_path} has no model_type (e.g. llama, qwen2, mistral).")
    data.pop("architectures", None)
    config = AutoConfig.for_model(model_type, **data)
    vocab = len(teacher_tokenizer)
    if config.vocab_size < vocab:
        raise InvalidConfigError(f"The student config's vocab_size ({config.vocab_size}) is smaller than the "
                                 f"teacher's tokenizer ({vocab} tokens); the student must share the tokenizer.")
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def read_student_config(config_path) -> dict:
    import json
    from pathlib import Path

    import yaml

    path = Path(config_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise InvalidConfigError(f"Student config {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise InvalidConfigError(f"Cannot read the student config {path}: {e}") from None
    if not isinstance(data, dict):
        raise InvalidConfigError(f"The student config {path} must be a mapping of config keys.")
    return data
