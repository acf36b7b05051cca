"""Which module produces the activation that which Linear layers read: SmoothQuant's and AWQ's mappings.

A mapping is a module whose output rows can be divided by per-channel scales s (a norm, or an up
projection) and the Linear layers that read that output (their weight columns are multiplied by s),
so the model computes the same function. Found per decoder layer from the architecture registry
(`registry.py`: which norm feeds attention, which feeds the MLP, MLA's inner norms, whether the
down projection's input is linear in up) and from the module graph (the gate / up projections of
dense MLPs, shared experts and every expert of a MoE layer; routers, which read the same input and
stay in full precision, are scaled too — otherwise routing would change).

`check_readers` then runs one real forward and keeps a norm mapping only where each reader's input
*is* the norm's output — what a post-norm architecture the registry does not know would fail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from llmquant.arch.experts import ExpertMLP
from llmquant.arch.layers import find_decoder_layers
from llmquant.arch.registry import ATTENTION_INPUTS, ArchSpec, is_router, model_spec
from llmquant.errors import InvalidConfigError

_MLP_INPUTS = r"(gate_proj|up_proj|gate_up_proj)"


@dataclass
class Mapping:
    smooth: str  # the module whose output is the activation
    balance: list[str]  # Linear layers reading it, quantized: columns multiplied by s
    co_scaled: list[str] = field(default_factory=list)  # readers kept in full precision (routers)
    readers: list[str] = field(default_factory=list)  # modules whose input must be smooth's output
    rows: tuple[int, int] | None = None  # only these output rows of `smooth` (up half of a fused gate_up)

    @property
    def observed(self) -> str:
        """The module whose input is the activation (statistics are collected there): the first
        reader (the MoE block, for experts), else the first balance layer (down, for up -> down)."""
        return (self.readers or self.balance)[0]


def find_mappings(model: nn.Module, spec: ArchSpec | None = None) -> list[Mapping]:
    """Every mapping of every decoder layer, norms first, then up -> down projections."""
    spec = spec or model_spec(model)
    try:
        prefix, layers = find_decoder_layers(model)
    except InvalidConfigError:  # no stack of decoder layers: nothing to smooth
        return []
    mappings: list[Mapping] = []
    for index, layer in enumerate(layers):
        p = f"{prefix}.{index}."
        modules = dict(layer.named_modules())
        mappings += [_prefixed(m, p) for m in _layer_mappings(modules, spec)]
    return mappings


def _layer_mappings(modules: dict[str, nn.Module], spec: ArchSpec) -> list[Mapping]:
    out: list[Mapping] = []
    linear = {n for n, m in modules.items() if isinstance(m, nn.Linear)}
    if spec.attention_norm in modules:
        attention = sorted((n for n in linear if re.fullmatch(ATTENTION_INPUTS, n)), key=list(modules).index)
        if attention:
            out.append(Mapping(spec.attention_norm, attention, readers=list(attention)))
    for norm, proj in spec.attention_pairs:
        if norm in modules and proj in linear:
            out.append(Mapping(norm, [proj], readers=[proj]))
    if spec.mlp_norm in modules and "mlp" in modules:
        mlp_inputs = [n for n in modules if n in linear and _is_mlp_input(n, modules)]
        if mlp_inputs:
            routers = [n for n, m in modules.items() if is_router(n) and _weight_2d(m) is not None]
            dense = [n for n in mlp_inputs if not _in_experts(n, modules)]
            # Experts and routers see tokens gathered per expert: their input is the MLP block's.
            readers = dense if len(dense) == len(mlp_inputs) and not routers else ["mlp"]
            out.append(Mapping(spec.mlp_norm, mlp_inputs, co_scaled=routers, readers=readers))
    if spec.up_feeds_down_linearly:
        out += _up_down_mappings(modules)
    return out


def _is_mlp_input(name: str, modules: dict[str, nn.Module]) -> bool:
    parent, _, leaf = name.rpartition(".")
    if isinstance(modules.get(parent), ExpertMLP):
        return leaf in modules[parent].projection_names[:2]  # gate and up
    return name.startswith("mlp.") and re.fullmatch(_MLP_INPUTS, leaf) is not None


def _in_experts(name: str, modules: dict[str, nn.Module]) -> bool:
    return isinstance(modules.get(name.rpartition(".")[0]), ExpertMLP)


def _up_down_mappings(modules: dict[str, nn.Module]) -> list[Mapping]:
    """up -> down inside each MLP (dense, shared experts, every expert): down reads act(gate) * up."""
    out = []
    for name, module in modules.items():
        if not (name == "mlp" or name.startswith("mlp.")):
            continue
        p = f"{name}."
        linear = {n for n in ("up_proj", "gate_up_proj", "down_proj")
                  if isinstance(getattr(module, n, None), nn.Linear)}
        if isinstance(module, ExpertMLP):
            _, up, down = module.projection_names
            out.append(Mapping(p + up, [p + down]))
        elif {"up_proj", "down_proj"} <= linear:
            out.append(Mapping(p + "up_proj", [p + "down_proj"]))
        elif {"gate_up_proj", "down_proj"} <= linear:
            rows = module.gate_up_proj.out_features
            out.append(Mapping(p + "gate_up_proj", [p + "down_proj"], rows=(rows // 2, rows)))  # [gate; up]
    return out


def _weight_2d(module: nn.Module) -> Tensor | None:
    w = getattr(module, "weight", None)
    return w if isinstance(w, Tensor) and w.ndim == 2 else None


def _prefixed(m: Mapping, p: str) -> Mapping:
    return Mapping(p + m.smooth, [p + b for b in m.balance], [p + c for c in m.co_scaled],
                   [p + r for r in m.readers], m.rows)


def check_readers(model: nn.Module, mappings: list[Mapping], ids: Tensor, run=None) -> dict[str, str]:
    """Run `ids` (1, L) through the model and return {smooth: why} for every mapping whose readers
    do not read exactly the smoothing module's output (e.g. a norm applied after attention).
    `run(hooks)`, when given, runs the probe instead (a streamed run: one decoder layer on its
    captured inputs) and removes the hooks."""
    outputs: dict[str, Tensor] = {}  # smoothing module -> its output on the probe
    read: set[tuple[str, str]] = set()  # (smoothing module, reader) pairs confirmed
    rejected: dict[str, str] = {}

    def keep(key: str):
        return lambda module, args, output: outputs.setdefault(key, output)

    def compare(key: str, reader: str):
        def hook(module, args):
            x, out = args[0] if args else None, outputs.get(key)
            if out is not None and isinstance(x, Tensor) and (x is out or (
                    x.numel() == out.numel() and torch.equal(x.reshape(-1), out.reshape(-1)))):
                read.add((key, reader))
            else:
                rejected.setdefault(key, f"{reader} does not read {key}'s output")
        return hook

    checked = [m for m in mappings if m.readers]
    hooks = []
    for mp in checked:
        hooks.append(model.get_submodule(mp.smooth).register_forward_hook(keep(mp.smooth)))
        hooks += [model.get_submodule(r).register_forward_pre_hook(compare(mp.smooth, r)) for r in mp.readers]
    if run is not None:
        run(hooks)
    else:
        try:
            with torch.inference_mode():
                model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
    for mp in checked:
        if mp.smooth not in rejected and any((mp.smooth, r) not in read for r in mp.readers):
            rejected[mp.smooth] = "a module reading it did not run on the probe"
    return rejected
