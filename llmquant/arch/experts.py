"""MoE experts as one small MLP per expert, each projection an `nn.Linear`.

transformers 5 holds a MoE layer's experts as fused 3-D parameters (`gate_up_proj` of shape
[experts, 2 x inter, hidden], or transposed and interleaved for gpt-oss), not as Linear modules, so
a quantizer that looks for Linear layers skips nearly all of a MoE model's weights. `linearize`
replaces each such module with `LinearExperts`: expert e is child "e" with gate / up / down
`nn.Linear` projections named as the checkpoint names them (`w1`/`w3`/`w2` for Mixtral). Every
tool that works on Linear layers (quantization, GPTQ's Hessian hooks, activation observers,
QuantizedLinear, saving by state_dict) then covers experts with no special case, and each expert
is quantized with its own scales.

The forward computes what transformers' eager experts forward computes: each expert runs on the
tokens routed to it, its output weighted by the routing weight; the gate function is the original
module's own (`_apply_gate`: SiLU(gate) * up, gpt-oss's clamped GLU, ...), applied to gate and up
put back in the original layout. For calibration, `all_tokens` names experts that also run on
every token (their observers then see all of them; the layer's output still sums routed
contributions only), and `count_routed()` counts the tokens each expert is routed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmquant.arch.registry import ExpertNames


class _GateFunction:
    """The fused module's `_apply_gate`, kept with the attributes it reads (act_fn, alpha, limit)
    after its weights are gone. A plain object, not a submodule, so it holds no state_dict entries."""

    def __init__(self, fused: nn.Module):
        self.interleaved = not getattr(fused, "is_concatenated", True)
        for name in list(fused._parameters):
            del fused._parameters[name]
        self._owner = fused
        self._apply = type(fused)._apply_gate

    def __call__(self, gate: Tensor, up: Tensor) -> Tensor:  # (T, I), (T, I) -> (T, I)
        if self.interleaved:
            gate_up = torch.stack((gate, up), dim=-1).flatten(-2)  # g0, u0, g1, u1, ...
        else:
            gate_up = torch.cat((gate, up), dim=-1)
        return self._apply(self._owner, gate_up)


class ExpertMLP(nn.Module):
    """One expert: gate, up and down projections under the checkpoint's names."""

    def __init__(self, names: ExpertNames, gate: nn.Linear, up: nn.Linear, down: nn.Linear, gate_fn: _GateFunction):
        super().__init__()
        self.projection_names = (names.gate, names.up, names.down)
        for name, module in zip(self.projection_names, (gate, up, down)):
            self.add_module(name, module)
        self._gate_fn = gate_fn

    def forward(self, x: Tensor) -> Tensor:  # (T, hidden) -> (T, hidden)
        gate, up, down = (getattr(self, n) for n in self.projection_names)
        # gate and up read the very same tensor: GPTQ's hooks share one Hessian between them.
        return down(self._gate_fn(gate(x), up(x)))


class LinearExperts(nn.Module):
    """Drop-in replacement of a fused experts module: forward(hidden_states, top_k_index, top_k_weights)."""

    def __init__(self, experts: list[ExpertMLP]):
        super().__init__()
        for i, expert in enumerate(experts):
            self.add_module(str(i), expert)
        self.num_experts = len(experts)
        self.all_tokens: set[int] = set()  # experts that also run on every token (calibration)
        self.routed_tokens: Tensor | None = None  # (E,) counts while counting, else None

    def __getitem__(self, index: int) -> ExpertMLP:
        return self._modules[str(index)]

    def __len__(self) -> int:
        return self.num_experts

    def count_routed(self, enable: bool = True) -> None:
        """Start (from zero) or stop counting the tokens routed to each expert."""
        self.routed_tokens = torch.zeros(self.num_experts, dtype=torch.long) if enable else None

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        # hidden_states (T, H); top_k_index, top_k_weights (T, K)
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # one_hot over E + 1 classes: some routers mark dropped slots with index E.
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # (E+1, K, T)
            hit = mask[: self.num_experts].sum(dim=(-1, -2))  # (E,) routed tokens per expert
        if self.routed_tokens is not None:
            self.routed_tokens += hit.cpu()
        for e in sorted(set(torch.nonzero(hit).flatten().tolist()) | self.all_tokens):
            slot, token = torch.where(mask[e])
            # An expert in all_tokens runs on every token (its observers see them all); only its
            # routed rows reach the output.
            y = self[e](hidden_states)[token] if e in self.all_tokens else self[e](hidden_states[token])
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers experts module holding all experts in 3-D `gate_up_proj` / `down_proj`
    parameters, with the layout flags transformers' experts decorator sets."""
    params = module._parameters
    gate_up, down = params.get("gate_up_proj"), params.get("down_proj")
    return (gate_up is not None and down is not None and gate_up.ndim == 3 and down.ndim == 3
            and hasattr(module, "is_transposed") and getattr(module, "has_gate", True)
            and hasattr(type(module), "_apply_gate"))


def split_fused(fused: nn.Module, names: ExpertNames) -> LinearExperts:
    """LinearExperts holding copies of `fused`'s weights (on its device, meta included); `fused`
    loses its parameters."""
    gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
    gate_up_bias = getattr(fused, "gate_up_proj_bias", None)
    down_bias = getattr(fused, "down_proj_bias", None)
    if fused.is_transposed:  # stored (E, in, out) for x @ W: make them (E, out, in) like nn.Linear
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    interleaved = not getattr(fused, "is_concatenated", True)
    num, inter = gate_up.shape[0], gate_up.shape[1] // 2
    rows_gate = slice(0, None, 2) if interleaved else slice(0, inter)
    rows_up = slice(1, None, 2) if interleaved else slice(inter, None)
    grad = fused.gate_up_proj.requires_grad
    experts = []
    for e in range(num):
        gate = _linear(gate_up[e, rows_gate], None if gate_up_bias is None else gate_up_bias[e, rows_gate], grad)
        up = _linear(gate_up[e, rows_up], None if gate_up_bias is None else gate_up_bias[e, rows_up], grad)
        proj_down = _linear(down[e], None if down_bias is None else down_bias[e], grad)
        experts.append((gate, up, proj_down))
    gate_fn = _GateFunction(fused)  # drops fused's parameters: after the copies above
    return LinearExperts([ExpertMLP(names, g, u, d, gate_fn) for g, u, d in experts])


def _linear(weight: Tensor, bias: Tensor | None, requires_grad: bool) -> nn.Linear:
    """An nn.Linear holding a contiguous copy of weight (out, in) and bias."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.contiguous().clone(), requires_grad=requires_grad)
    return layer


def linearize(model: nn.Module, names: ExpertNames) -> int:
    """Replace every fused experts module of `model` by LinearExperts; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if is_fused_experts(module):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, split_fused(module, names))
            count += 1
    return count
