"""Decide, before any work, what happens to every targeted layer.

Group-wise schemes need each layer's input width to be a multiple of the group size. When
the user did not choose a group size, the preset's (128) is lowered to the largest of 64/32
that fits every layer, and the choice is announced. When the user did choose one, a layer
that does not fit is an error naming it — unless the recipe's `group_size_fallback` says
`channel` (quantize that layer per output channel instead) or `skip` (keep it in full
precision).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from llmquant.arch.registry import DEFAULT, ROUTER_NOTE, ArchSpec, is_router, model_spec, to_checkpoint_name
from llmquant.errors import InvalidConfigError
from llmquant.config.args import QuantScheme
from llmquant.config.recipe import Recipe

AUTO_GROUP_SIZES = (128, 64, 32)


@dataclass
class LayerPlan:
    name: str
    module: nn.Linear
    scheme: QuantScheme | None  # None: kept in full precision
    note: str | None = None


def auto_group_size(recipe: Recipe, layers: list[tuple[str, nn.Linear]]) -> tuple[Recipe, str | None]:
    """Lower the group size to one that divides every layer's width; returns a message if changed."""
    w = recipe.scheme.weights
    if w.strategy != "group":
        return recipe, None
    widths = {m.in_features for _, m in layers}
    for g in AUTO_GROUP_SIZES:
        if g <= w.group_size and all(width % g == 0 for width in widths):
            if g == w.group_size:
                return recipe, None
            misfit_widths = ", ".join(str(x) for x in sorted(x for x in widths if x % w.group_size))
            return recipe.with_overrides(weights={"group_size": g}), (
                f"group size {g} chosen: input width(s) {misfit_widths} are not multiples of "
                f"{w.group_size} (pass --group-size to choose)")
    return recipe, None


def plan_layers(recipe: Recipe, layers: list[tuple[str, nn.Linear]]) -> list[LayerPlan]:
    w = recipe.scheme.weights
    plans: list[LayerPlan] = []
    misfits = []
    for name, module in layers:
        if is_router(name):  # a Linear router (Qwen2-MoE's shared_expert_gate): full precision by default
            plans.append(LayerPlan(name, module, None, ROUTER_NOTE))
            continue
        if w.strategy == "group" and module.in_features % w.group_size:
            misfits.append((name, module))
            continue
        plans.append(LayerPlan(name, module, recipe.scheme))
    if not misfits:
        return plans
    if recipe.group_size_fallback == "error":
        listed = ", ".join(f"{n} (width {m.in_features})" for n, m in misfits[:4])
        more = f" and {len(misfits) - 4} more" if len(misfits) > 4 else ""
        raise InvalidConfigError(
            f"Group size {w.group_size} does not divide the input width of {len(misfits)} layer(s): "
            f"{listed}{more}. Choose a group size that divides them (e.g. --group-size 64 or 32), "
            "or pass --group-size-fallback channel (quantize those layers per output channel) or "
            "--group-size-fallback skip (keep them in full precision).")
    channel = dataclasses.replace(w, strategy="channel", group_size=None)
    fallback_scheme = recipe.scheme.replace(weights=channel)
    for name, module in misfits:
        note = f"width {module.in_features} not a multiple of group size {w.group_size}"
        if recipe.group_size_fallback == "channel":
            plans.append(LayerPlan(name, module, fallback_scheme, note + ": per-channel instead"))
        else:
            plans.append(LayerPlan(name, module, None, note))
    return plans


def config_groups(recipe: Recipe, plans: list[LayerPlan], spec: ArchSpec = DEFAULT
                  ) -> list[tuple[QuantScheme, list[str]]]:
    """compressed-tensors config groups: the recipe's scheme on its targets, then one group per other
    scheme (fallback or mixed-precision layers) listing its layers by name (an exact name outranks a
    class or regex target in every reader). Names are the checkpoint's (`spec`)."""
    groups: list[tuple[QuantScheme, list[str]]] = [(recipe.scheme, [to_checkpoint_name(t, spec)
                                                                    for t in recipe.targets])]
    others: dict[QuantScheme, list[str]] = {}
    for p in plans:
        if p.scheme is not None and p.scheme != recipe.scheme:
            others.setdefault(p.scheme, []).append(to_checkpoint_name(p.name, spec))
    return groups + list(others.items())


def unquantized_linear_names(model: nn.Module, plans: list[LayerPlan]) -> list[str]:
    """Every Linear left in full precision, listed by name in the checkpoint's `ignore` (as the
    checkpoint names it)."""
    spec = model_spec(model)
    quantized = {p.name for p in plans if p.scheme is not None}
    return [to_checkpoint_name(n, spec) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n not in quantized]
