"""Sequential calibration: feed calibration text through a model one decoder layer at a time.

The inputs of the first decoder layer are captured (the model runs only up to it), then for
each layer k:
  1. the layer runs over every calibration batch with observation hooks attached
     (`handler.attach`: e.g. Hessian accumulation for GPTQ; statistics, never activations);
  2. `handler.finish` quantizes the layer in place;
  3. the *quantized* layer runs over the same batches, and its outputs replace its inputs as
     the next layer's inputs, so each layer is calibrated on what the quantized model upstream
     actually produces. Its quantized Linear layers are dequantized once for this pass (not once
     per batch, as the kernel registry's many-row path does: that was a fifth of a GPTQ run),
     which computes the very numbers the registry's dequantize-then-matmul path gives. The last
     layer's outputs feed nothing, so that layer skips this pass.
Only one layer's inputs (samples x length x width) are held at a time, whatever the depth.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from llmquant.arch.layers import find_decoder_layers
from llmquant.quant.linear import QuantizedLinear
from llmquant.quant.primitives import quantize_activation


class LayerHandler(Protocol):
    def attach(self, index: int, prefix: str, layer: nn.Module) -> list: ...  # hook handles

    def finish(self, index: int, prefix: str, layer: nn.Module) -> None: ...

    # Optional: `refill(index, prefix, layer) -> bool`, called after the statistics pass; True runs
    # the pass once more (hooks still attached).


@dataclass
class LayerInputs:
    """Positional and keyword arguments of one decoder layer's call, one entry per batch."""

    calls: list[tuple[tuple, dict]]

    def hidden_states(self) -> list[Tensor]:
        return [args[0] for args, _ in self.calls]


class _Captured(Exception):
    pass


def capture_first_inputs(model: nn.Module, first_layer: nn.Module, batches: Tensor, batch_size: int,
                         device: torch.device) -> LayerInputs:
    """Run the model up to its first decoder layer on each batch and keep that layer's arguments."""
    calls: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        calls.append((tuple(args), dict(kwargs)))
        raise _Captured

    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            for chunk in batches.split(batch_size):
                try:
                    model(input_ids=chunk.to(device), use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return LayerInputs(calls)


class DequantizedOnce(nn.Module):
    """Stands in for a QuantizedLinear while calibration batches run through it: the forward of its
    dequantize-then-matmul path (activations rounded to their grid when the scheme quantizes them,
    the weight dequantized in the compute dtype, `F.linear`, then the bias), with the weight
    dequantized once per dtype instead of on every call."""

    def __init__(self, layer: QuantizedLinear):
        super().__init__()
        self.layer = layer
        self.weights: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        q = self.layer
        key = (x.device, x.dtype)
        if key not in self.weights:
            self.weights[key] = q.dequantized_weight(x.dtype).to(x.device)
        x2 = x.reshape(-1, q.in_features)  # (M, K)
        act = q.scheme.input_activations
        if act is not None:
            x2 = quantize_activation(x2, act, getattr(q, "input_scale", None))
        y = F.linear(x2, self.weights[key])  # (M, N)
        if q.bias is not None:
            y = y + q.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], q.out_features)


@contextlib.contextmanager
def dequantized_once(layer: nn.Module):
    """Within the block, every QuantizedLinear inside `layer` is replaced by its `DequantizedOnce`;
    the quantized layers are put back on exit, whatever happens."""
    swapped = []
    for name, module in list(layer.named_modules()):
        if isinstance(module, QuantizedLinear):
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, child, DequantizedOnce(module))
            swapped.append((parent, child, module))
    try:
        yield
    finally:
        for parent, child, module in swapped:
            setattr(parent, child, module)


def run_layer(layer: nn.Module, inputs: LayerInputs, keep_outputs: bool) -> bool:
    """Run a decoder layer on every batch of `inputs`; `keep_outputs`: its outputs become the inputs.
    Returns whether the layer returns a tuple (hidden states first) rather than the hidden states."""
    as_tuple = False
    with torch.inference_mode():
        for i, (args, kwargs) in enumerate(inputs.calls):
            out = layer(*args, **kwargs)
            as_tuple = isinstance(out, (tuple, list))
            if keep_outputs:
                hidden = out[0] if as_tuple else out
                inputs.calls[i] = ((hidden,) + tuple(args[1:]), kwargs)
    return as_tuple


def calibrate_layer(handler: LayerHandler, k: int, name: str, layer: nn.Module, inputs: LayerInputs, *,
                    propagate: bool) -> None:
    """Steps 1-3 of the module docstring for decoder layer k; `propagate=False` (the last layer)
    leaves `inputs` as they are. In-memory and streamed runs both calibrate each layer here."""
    handles = handler.attach(k, name, layer)
    try:
        run_layer(layer, inputs, keep_outputs=False)
        # A handler may ask for one more statistics pass (MoE experts routed too few tokens).
        refill = getattr(handler, "refill", None)
        if refill is not None and refill(k, name, layer):
            run_layer(layer, inputs, keep_outputs=False)
    finally:
        for h in handles:
            h.remove()
    handler.finish(k, name, layer)
    if propagate:
        with dequantized_once(layer):
            run_layer(layer, inputs, keep_outputs=True)


def run_sequential(model: nn.Module, batches: Tensor, handler: LayerHandler, *, batch_size: int = 4,
                   progress: bool = True, start_layer: int = 0, inputs: LayerInputs | None = None,
                   on_layer_done: Callable[[int, str, nn.Module, LayerInputs], None] | None = None,
                   desc: str = "quantizing layer by layer") -> None:
    """Calibrate and quantize decoder layer by layer (see the module docstring).

    `start_layer` with `inputs` (that layer's captured inputs) resumes an interrupted run;
    `on_layer_done(k, prefix, layer, next_inputs)` is called after layer k (to save a resume point)."""
    prefix, layers = find_decoder_layers(model)
    device = next(model.parameters()).device
    if inputs is None:
        if start_layer:
            raise ValueError("resuming from a later layer needs that layer's inputs")
        inputs = capture_first_inputs(model, layers[0], batches, batch_size, device)
    bar = tqdm(total=len(layers), initial=start_layer, desc=desc, unit="layer",
               disable=not progress)
    t0, done = time.perf_counter(), 0
    try:
        for k in range(start_layer, len(layers)):
            layer = layers[k]
            calibrate_layer(handler, k, f"{prefix}.{k}", layer, inputs, propagate=k + 1 < len(layers))
            done += 1
            bar.update(1)
            if on_layer_done is not None:
                on_layer_done(k, f"{prefix}.{k}", layer, inputs)
            if not progress:
                continue
            per_layer = (time.perf_counter() - t0) / done
            bar.set_postfix_str(f"{per_layer:.1f} s/layer", refresh=False)
    finally:
        bar.close()
    if progress:
        elapsed = time.perf_counter() - t0
        print(f"  {done} layers in {elapsed:.1f} s", file=sys.stderr)
