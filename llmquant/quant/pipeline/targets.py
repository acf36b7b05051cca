"""Which modules a scheme applies to, with compressed-tensors' matching rules.

A pattern matches a module when it equals the module's full name, when it starts with
"re:" and the rest `re.match`es the name, or when it equals the name of the module's class
or one of its base classes ("Linear"). When several config groups match one module, the most
specific wins: exact name, then regex, then class — the order vLLM and compressed-tensors
apply, so a checkpoint means the same thing to every reader.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

from torch import nn

from llmquant.arch.registry import model_spec, to_checkpoint_name
from llmquant.errors import InvalidConfigError


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__ if issubclass(cls, nn.Module)}


def match_kind(name: str, module: nn.Module, pattern: str) -> int | None:
    """0 for an exact-name match, 1 for a regex match, 2 for a class match, None otherwise."""
    if pattern.startswith("re:"):
        return 1 if re.match(pattern[3:], name) else None
    if pattern == name:
        return 0
    if pattern in _class_names(module):
        return 2
    return None


def matches(name: str, module: nn.Module, patterns: Iterable[str]) -> bool:
    return any(match_kind(name, module, p) is not None for p in patterns)


def best_group(name: str, module: nn.Module, groups: list[list[str]]) -> int | None:
    """Index of the config group whose targets match `module` most specifically."""
    best: tuple[int, int] | None = None
    for i, targets in enumerate(groups):
        kinds = [k for k in (match_kind(name, module, t) for t in targets) if k is not None]
        if kinds and (best is None or min(kinds) < best[0]):
            best = (min(kinds), i)
    return None if best is None else best[1]


def validate_patterns(patterns: Iterable[str], what: str) -> None:
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise InvalidConfigError(f"Invalid regular expression {p!r} in {what}: {e}.") from None


def linear_layers(model: nn.Module, targets: Iterable[str], ignore: Iterable[str]
                  ) -> Iterator[tuple[str, nn.Linear]]:
    """(name, module) of the nn.Linear modules matched by `targets` and not by `ignore`. A pattern
    may name a module as transformers does in memory or as the checkpoint does (Mixtral's
    `mlp.experts.0.w1` is `block_sparse_moe.experts.0.w1` on disk): either matches."""
    targets, ignore = list(targets), list(ignore)
    spec = model_spec(model)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        names = (name, to_checkpoint_name(name, spec))
        if any(matches(n, module, targets) for n in names) and not any(matches(n, module, ignore) for n in names):
            yield name, module


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
