"""What share of a model's weights a quantization covered, and why the rest stayed in full precision.

Counted on the quantized model: every weight matrix (a parameter with two or more dimensions) is
either inside a QuantizedLinear, by scheme, or listed with the reason it was kept — the recipe's
default ignore (`lm_head`), the user's `--ignore`, a router, an embedding, a group size that does
not divide it, a module that is not a Linear layer. Nothing is skipped silently: a MoE model whose
experts stayed in bf16 shows up here as a small quantized share, and `warnings()` says so.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from torch import nn

from llmquant.arch.registry import ROUTER_NOTE, is_router, model_spec, to_checkpoint_name
from llmquant.quant.linear import QuantizedLinear
from llmquant.quant.pipeline.targets import match_kind

DEFAULT_IGNORE = ("lm_head",)
LOW_SHARE = 0.5  # below this share of non-embedding parameters quantized, the run warns


@dataclass
class KeptGroup:
    """Weight matrices kept in full precision for one reason, their names collapsed over layers."""

    pattern: str  # e.g. model.layers.*.mlp.gate
    reason: str
    count: int
    params: int


@dataclass
class Coverage:
    total_params: int
    embedding_params: int
    quantized_params: dict[str, int] = field(default_factory=dict)  # scheme -> parameters
    kept: list[KeptGroup] = field(default_factory=list)

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params

    @property
    def quantized_share(self) -> float:
        """Quantized parameters over non-embedding parameters (norms and biases included)."""
        return sum(self.quantized_params.values()) / max(1, self.non_embedding_params)

    def lines(self) -> list[str]:
        by_scheme = ", ".join(f"{scheme}: {100 * n / max(1, self.non_embedding_params):.1f}%"
                              for scheme, n in self.quantized_params.items())
        out = [f"quantized {100 * self.quantized_share:.1f}% of the {self.non_embedding_params:,} non-embedding "
               f"parameters ({by_scheme or 'none'})"]
        for g in self.kept:
            times = f" x{g.count}" if g.count > 1 else ""
            out.append(f"  kept in full precision: {g.pattern}{times} ({g.params:,} parameters): {g.reason}")
        return out

    def warnings(self) -> list[str]:
        if self.quantized_share >= LOW_SHARE:
            return []
        largest = max(self.kept, key=lambda g: g.params, default=None)
        hint = f"; the largest part kept is {largest.pattern} ({largest.reason})" if largest else ""
        return [f"WARNING: only {100 * self.quantized_share:.1f}% of the non-embedding parameters were quantized"
                f"{hint}. The checkpoint will be about as large as the original."]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(non_embedding_params=self.non_embedding_params, quantized_share=self.quantized_share)
        return d


def measure_coverage(model: nn.Module, notes: dict[str, str], targets, ignore) -> Coverage:
    """The coverage of `model` after quantization. `notes`: reasons the plan gave for Linear layers
    it kept (routers, group size); `targets`/`ignore`: the recipe's patterns, for the others."""
    spec = model_spec(model)
    tied = {id(p) for p in _tied_parameters(model)}
    # A QuantizedLinear's weight is a buffer (packed): count the matrix it stands for.
    total = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    cov = Coverage(total_params=total, embedding_params=embedding)
    kept: dict[tuple[str, str], list[int]] = defaultdict(list)
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            scheme, size = module.scheme.describe(), module.in_features * module.out_features
            cov.quantized_params[scheme] = cov.quantized_params.get(scheme, 0) + size
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim < 2 or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{name}.{pname}" if name else pname
            if id(p) in tied and not isinstance(module, nn.Embedding):
                continue  # the output layer tied to the embedding: counted once, as the embedding
            reason = _reason(name, module, notes, targets, ignore, spec)
            kept[(_collapse(full if pname != "weight" else name), reason)].append(p.numel())
    cov.kept = sorted((KeptGroup(pattern, reason, len(sizes), sum(sizes)) for (pattern, reason), sizes in kept.items()),
                      key=lambda g: -g.params)
    return cov


def _reason(name: str, module: nn.Module, notes: dict[str, str], targets, ignore, spec) -> str:
    if name in notes:
        return notes[name]
    if isinstance(module, nn.Embedding):
        return "embedding, default (embeddings are not quantized)"
    if is_router(name):
        return ROUTER_NOTE
    if isinstance(module, nn.Linear):
        on_disk = to_checkpoint_name(name, spec)
        for pattern in ignore:
            if any(match_kind(n, module, pattern) is not None for n in (name, on_disk)):
                return f"ignore {pattern!r}" + (", default" if pattern in DEFAULT_IGNORE else " (--ignore)")
        return f"not matched by targets {list(targets)}"
    return f"not a Linear layer ({type(module).__name__})"


def _collapse(name: str) -> str:
    """model.layers.3.mlp.experts.7.w1 -> model.layers.*.mlp.experts.*.w1"""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _tied_parameters(model: nn.Module) -> list:
    out = getattr(model, "get_output_embeddings", lambda: None)()
    inp = getattr(model, "get_input_embeddings", lambda: None)()
    if out is not None and inp is not None and getattr(out, "weight", None) is getattr(inp, "weight", 0):
        return [out.weight]
    return []
