"""GPTQ over a whole model, straight into each weight's planned GGUF block type.

The model runs on the calibration windows one decoder layer at a time
(llmquant/quant/pipeline/sequential.py): while a layer runs, a pre-hook on each of its Linear
layers that the plan quantizes folds the layer's input into a running Hessian (Linear layers
reading the very same input tensor, q/k/v or gate/up, share one); then each weight is quantized
with `gptq_to_type` into its type, its float weight is replaced by what the codes stand for, and
the layer runs again so that the next layer is calibrated on what the quantized model upstream
produces. Weights outside the decoder stack (embeddings, output) are rounded with the scale search
(no Hessian reaches them layer by layer).

llama.cpp does not multiply our weights by the activations as they are: its CPU and CUDA kernels
first round each block of activations to 8 bits (Q8_0 in blocks of 32), adding noise of variance
(block max / 127)^2 / 12 to every input. GPTQ on the plain Hessian pushes rounding error onto the
rarely active input columns, which is free in float but meets that noise in llama.cpp. For Q8_0
weights, whose own rounding is no larger than the activations', that was measured: on the demo
model (16 x 512 calibration tokens, 2,044 held-out tokens) a Q8_0 file scored perplexity 12.011
dequantized in float and 12.122 in llama.cpp (plain rounding: 12.032 and 12.070). With the noise
on the Hessian's diagonal (`ActivationNoise`) GPTQ minimizes the error llama.cpp sees: 12.064 in
llama.cpp, below llama.cpp's own Q8_0 (12.067). For 4- and 5-bit weights the weights' rounding
dominates and the extra diagonal only weakened GPTQ (Q4_0 12.716 -> 12.821, Q4_K_M 12.222 ->
12.326 in llama.cpp on the same windows), so it is added for 8-bit types only (NOISE_AWARE_BITS).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmquant.export.gguf.ggml_types import GGMLType
from llmquant.export.gguf.quantize_tensor import TypedWeight, gptq_to_type
from llmquant.quant.algorithms.gptq import accumulate_hessian
from llmquant.quant.algorithms.shared_inputs import SharedInputs
from llmquant.quant.primitives import sqnr_db

SEQUENTIAL_BATCH = 4  # calibration windows per forward call
ACTIVATION_LEVELS = 127.0  # llama.cpp's Q8_0 activations: block max -> 127
ACTIVATION_BLOCK = 32
NOISE_AWARE_BITS = 8  # weight types at least this wide get the activation noise (module docstring)


class ActivationNoise:
    """Running mean, per input column, of the variance llama.cpp's 8-bit rounding of activations
    adds: (max |x| over the column's block of 32 / 127)^2 / 12."""

    def __init__(self) -> None:
        self.mean: Tensor | None = None  # (columns / 32,)
        self.count = 0

    def add(self, x: Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        m, width = rows.shape
        if m == 0 or width % ACTIVATION_BLOCK:
            return
        total = self.count + m
        peak = rows.abs().reshape(m, width // ACTIVATION_BLOCK, ACTIVATION_BLOCK).amax(-1)  # (m, blocks)
        var = (peak / ACTIVATION_LEVELS).pow(2).sum(0) / 12.0
        self.mean = var / total if self.mean is None else self.mean * (self.count / total) + var / total
        self.count = total

    def diagonal(self) -> Tensor | None:
        """2 x the per-column variance (the Hessian is 2/n sum x x^T), or None when the width is not
        a multiple of 32."""
        return None if self.mean is None else 2.0 * self.mean.repeat_interleave(ACTIVATION_BLOCK)


class InputStatistics:
    """What one group of Linear layers reading the same input accumulates."""

    def __init__(self) -> None:
        self.hessian: Tensor | None = None
        self.count = 0
        self.noise = ActivationNoise()

    def add(self, x: Tensor) -> None:
        self.hessian, self.count = accumulate_hessian(self.hessian, self.count, x)
        self.noise.add(x)

    def hessian_for(self, t: GGMLType) -> Tensor:
        """The Hessian GPTQ uses for weights of type t: plus llama.cpp's activation noise for 8-bit
        types (module docstring)."""
        extra = self.noise.diagonal() if t.bits >= NOISE_AWARE_BITS else None
        if extra is None:
            return self.hessian
        return self.hessian + torch.diag(extra.to(self.hessian.dtype))


class GGUFGPTQHandler:
    """The `LayerHandler` of `run_sequential`: Hessians in, typed weights out (`results`)."""

    def __init__(self, model: nn.Module, types: dict[str, GGMLType], *, dampening: float):
        self.model, self.types, self.dampening = model, types, dampening
        # module name (e.g. model.layers.0.mlp.down_proj) -> (typed weight, its weight SQNR in dB)
        self.results: dict[str, tuple[TypedWeight, float]] = {}
        # module name -> its inputs' statistics (one object for the layers that read the same input)
        self._inputs: SharedInputs[InputStatistics] = SharedInputs(InputStatistics)

    def attach(self, index: int, prefix: str, layer: nn.Module) -> list:
        handles = []
        self._inputs = SharedInputs(InputStatistics)
        for name, module in layer.named_modules():
            full = f"{prefix}.{name}"
            if isinstance(module, nn.Linear) and full in self.types:
                handles.append(module.register_forward_pre_hook(self._hook(full)))
        return handles

    def _hook(self, name: str):
        def observe(module: nn.Module, args: tuple) -> None:
            entry = self._inputs.observe(name, args[0])
            if entry is not None:  # None: a layer sharing the previous one's input reads its statistics
                entry.add(args[0])

        return observe

    def finish(self, index: int, prefix: str, layer: nn.Module) -> None:
        # Layers that share a Hessian and a type are quantized in one call, their weights stacked:
        # GPTQ treats rows independently, so this is the same result with one column loop, not three.
        groups: dict[tuple[str, str], list[str]] = {}
        for name, owner in self._inputs.owners.items():
            groups.setdefault((owner, self.types[name].name), []).append(name)
        for names in groups.values():
            hessian = self._inputs.entries[names[0]].hessian_for(self.types[names[0]])
            modules = [self.model.get_submodule(n) for n in names]
            weights = [m.weight.detach() for m in modules]
            typed = gptq_to_type(torch.cat(weights), hessian, self.types[names[0]], dampening=self.dampening)
            row = 0
            for name, module, weight in zip(names, modules, weights):
                part = typed.rows(slice(row, row + weight.shape[0]))
                row += weight.shape[0]
                self.results[name] = (part, sqnr_db(weight.float(), part.dequantized))
                module.weight.data.copy_(part.dequantized.to(weight.dtype))
        self._inputs = SharedInputs(InputStatistics)


def gptq_model(model: nn.Module, types: dict[str, GGMLType], batches: Tensor, *, dampening: float,
               progress: bool) -> dict[str, tuple[TypedWeight, float]]:
    """Quantize the decoder stack's Linear layers named in `types` (module name -> type) by GPTQ
    on `batches` (samples, seq_len); returns module name -> (TypedWeight, weight SQNR in dB). The model's weights are
    left dequantized (what the file's codes stand for)."""
    from llmquant.quant.pipeline.sequential import run_sequential

    handler = GGUFGPTQHandler(model, types, dampening=dampening)
    run_sequential(model, batches, handler, batch_size=SEQUENTIAL_BATCH, progress=progress)
    return handler.results
