"""Before layer-by-layer calibration starts: how much memory and time it will take, and whether it fits.

Peak memory beyond the model itself is what sequential calibration holds at once:
- one decoder layer's inputs for every calibration sample: samples x length x width values;
- the Hessians of one decoder layer's Linear layers (in x in float32 each; an upper bound, as
  layers reading the same input share one);
- the activations of one batch inside one layer (attention scores and the MLP's wide part),
  and GPTQ's working copies of the largest stacked weight.
A plan that does not fit in the memory available now is refused, naming the number of samples
(or the sequence length) that would fit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from llmquant.errors import InvalidConfigError
from llmquant.arch.layers import find_decoder_layers

HEADROOM = 0.85  # of the memory available now; the rest is left to the allocator and the OS
_GIB = 1024 ** 3


@dataclass
class SequentialPlan:
    samples: int
    seq_len: int
    batch_size: int
    width: int
    layers: int
    device: str
    inputs_bytes: int
    hessian_bytes: int
    working_bytes: int
    model_bytes: int
    available_bytes: int | None
    seconds_estimate: float

    @property
    def extra_bytes(self) -> int:
        """Peak beyond the model already in memory."""
        return self.inputs_bytes + self.hessian_bytes + self.working_bytes

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.extra_bytes <= HEADROOM * self.available_bytes

    def describe(self) -> str:
        where = "GPU" if self.device.startswith("cuda") else "host RAM"
        avail = f"{self.available_bytes / _GIB:.2f} GiB available" if self.available_bytes is not None else "available unknown"
        return (f"plan: {self.layers} layers, {self.samples} x {self.seq_len} tokens (batches of {self.batch_size}) "
                f"on {self.device}; peak {where} beyond the model ({self.model_bytes / _GIB:.2f} GiB): "
                f"{self.extra_bytes / _GIB:.2f} GiB = layer inputs {self.inputs_bytes / _GIB:.2f} + Hessians "
                f"{self.hessian_bytes / _GIB:.2f} + working {self.working_bytes / _GIB:.2f} ({avail}); "
                f"time about {_minutes(self.seconds_estimate)}")

    def max_samples(self) -> int:
        """The most calibration samples that fit at this sequence length (0: none)."""
        if self.available_bytes is None:
            return self.samples
        room = HEADROOM * self.available_bytes - self.hessian_bytes - self.working_bytes
        per_sample = self.inputs_bytes / self.samples
        return max(0, int(room // per_sample))


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated: free GPU memory on CUDA, MemAvailable on Linux hosts."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a mid-sized matmul here and now (about 0.1 s), for the time estimate."""
    a = torch.randn(512, 1024, device=device, dtype=dtype)
    b = torch.randn(1024, 1024, device=device, dtype=dtype)
    a @ b
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < 0.1:
        a @ b
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * 512 * 1024 * 1024 * n / (time.perf_counter() - t)


def gptq_calibration_bytes(model: nn.Module, samples: int, seq_len: int, batch_size: int, elem: int,
                           quantized_names: set[str] | None) -> tuple[int, int, int]:
    """(layer inputs, Hessians, working space) of layer-by-layer GPTQ, bytes; the module docstring
    says what each counts. `quantized_names` None: every Linear of the stack gets a Hessian."""
    prefix, layers = find_decoder_layers(model)
    config = getattr(model, "config", None)
    per_layer = [[(f"{prefix}.{k}.{n}", m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
                 for k, layer in enumerate(layers)]
    every = [m for linears in per_layer for _, m in linears]
    width = getattr(config, "hidden_size", None) or (every[0].in_features if every else 0)
    widest = max((m.out_features for m in every), default=width)
    heads = getattr(config, "num_attention_heads", 1) or 1
    # Layers differ (DeepSeek's first layers are dense, the rest MoE): the largest one sets the peak.
    hessian = max((sum(4 * m.in_features ** 2 for n, m in linears if quantized_names is None or n in quantized_names)
                   for linears in per_layer), default=0)
    inputs = samples * seq_len * width * elem
    rows = batch_size * seq_len
    working = rows * (4 * widest + 6 * width) * elem + batch_size * heads * seq_len * seq_len * elem
    biggest = max((m.weight.numel() for m in every), default=0)
    working += 3 * 4 * biggest * 3  # stacked q/k/v-sized weight, float32, a few copies
    return inputs, hessian, working


def plan_sequential(model: nn.Module, samples: int, seq_len: int, batch_size: int,
                    quantized_names: set[str]) -> SequentialPlan:
    """The plan for calibrating `model` layer by layer; `quantized_names` get a Hessian each."""
    prefix, layers = find_decoder_layers(model)
    param = next(model.parameters())
    device, elem = param.device, param.element_size()
    every = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)]
    width = getattr(getattr(model, "config", None), "hidden_size", None) or (every[0].in_features if every else 0)
    inputs, hessian, working = gptq_calibration_bytes(model, samples, seq_len, batch_size, elem, quantized_names)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # A MoE expert runs on its share of the tokens (experts per token / experts).
    share = _expert_token_share(model)
    params = sum(m.weight.numel() * share.get(id(m), 1.0) for m in every)
    hessian_work = sum(m.in_features ** 2 * share.get(id(m), 1.0) for m in every)
    tokens = samples * seq_len
    # Two runs of each layer (observe, then propagate the quantized outputs), attention's
    # L x L products, and the Hessian products; GPTQ's own loop is small next to them.
    flops = 2 * 2 * tokens * params + len(layers) * 2 * 2 * 2 * tokens * seq_len * width + 2 * tokens * hessian_work
    seconds = flops / _matmul_rate(device, param.dtype)
    return SequentialPlan(samples=samples, seq_len=seq_len, batch_size=batch_size, width=width, layers=len(layers),
                          device=str(device), inputs_bytes=inputs, hessian_bytes=hessian, working_bytes=working,
                          model_bytes=model_bytes, available_bytes=available_memory(device), seconds_estimate=seconds)


def _expert_token_share(model: nn.Module) -> dict[int, float]:
    """id(Linear) -> the share of tokens it sees, for the Linear layers of MoE experts."""
    from llmquant.arch.experts import LinearExperts

    top_k = getattr(getattr(model, "config", None), "num_experts_per_tok", None) or 1
    share = {}
    for experts in (m for m in model.modules() if isinstance(m, LinearExperts)):
        for linear in experts.modules():
            if isinstance(linear, nn.Linear):
                share[id(linear)] = min(1.0, top_k / len(experts))
    return share


def check_plan(plan: SequentialPlan) -> None:
    """Refuse a plan that will not fit, naming the settings that would."""
    if plan.fits:
        return
    fit = plan.max_samples()
    if fit >= 1:
        advice = f"use --num-samples {fit} or fewer (or a shorter --seq-len)"
    else:
        advice = "even one sample does not fit: use a shorter --seq-len, or calibrate on a machine with more memory"
    raise InvalidConfigError(f"Calibration would not fit in memory. {plan.describe()}. To fit: {advice}.")


# ---- whole model in memory, or streamed one decoder layer at a time ------------------------------

@dataclass
class Peaks:
    """Peak memory of a quantize run both ways, from the model's shapes alone (nothing loaded)."""

    in_memory_bytes: int  # the whole model in the compute dtype, plus calibration
    streamed_bytes: int  # the largest of: what is read before the stack, one layer, what is read after
    checkpoint_bytes: int  # the source's weights in the compute dtype
    largest_layer_bytes: int
    calibration_bytes: int  # the calibration part, the same both ways
    available_bytes: int | None = None

    def fits_in_memory(self) -> bool:
        return self.available_bytes is None or self.in_memory_bytes <= HEADROOM * self.available_bytes

    def describe(self) -> str:
        avail = f"{self.available_bytes / _GIB:.2f} GiB available" if self.available_bytes is not None else \
            "available unknown"
        return (f"memory plan: whole model in memory {self.in_memory_bytes / _GIB:.2f} GiB, streamed one layer at a "
                f"time {self.streamed_bytes / _GIB:.2f} GiB (weights {self.checkpoint_bytes / _GIB:.2f} GiB, "
                f"largest decoder layer {self.largest_layer_bytes / _GIB:.2f} GiB, calibration "
                f"{self.calibration_bytes / _GIB:.2f} GiB; {avail}; plus the Python runtime)")


def plan_peaks(model: nn.Module, samples: int, seq_len: int, *, gptq: bool, quantized_names: set[str] | None = None,
               elem: int | None = None, verify_tokens: int = 0, batch_size: int = 4,
               device: torch.device | None = None) -> Peaks:
    """Peaks of quantizing `model` (its parameters may be on the meta device) both ways.

    Calibration (the same both ways): GPTQ holds one layer's inputs for every sample, its Hessians
    and working copies (as `plan_sequential` counts them); plain rounding holds a float32 copy of the
    largest weight a few times. Verification holds the original's log-probabilities (in memory)
    or two streams of hidden states and one window's logits (streamed)."""
    prefix, layers = find_decoder_layers(model)
    param = next(model.parameters())
    elem = elem or param.element_size()
    config = getattr(model, "config", None)
    width = getattr(config, "hidden_size", None) or 0
    vocab = getattr(config, "vocab_size", None) or 0
    seen: set[int] = set()

    def size(module: nn.Module) -> int:
        total = 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * elem
        return total

    layer_bytes = [size(layer) for layer in layers]
    outside = sum(p.numel() * elem for n, p in model.named_parameters() if not n.startswith(prefix + "."))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_bytes = head.weight.numel() * elem if head is not None else 0
    checkpoint = sum(layer_bytes) + outside - (head_bytes if getattr(config, "tie_word_embeddings", False) else 0)
    if gptq:
        calibration = sum(gptq_calibration_bytes(model, samples, seq_len, batch_size, elem, quantized_names))
    else:
        biggest = max((m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, nn.Linear)),
                      default=0)
        calibration = 3 * 4 * biggest
    window = 512  # finish.VERIFY_WINDOW
    in_memory_check = verify_tokens * vocab * 2  # float16 log-probabilities of the original
    # two streams of hidden states, and one window's logits both ways
    streamed_check = 2 * verify_tokens * width * 4 + 2 * window * vocab * 4 if verify_tokens else 0
    in_memory = checkpoint + calibration + in_memory_check
    after = head_bytes + width * elem
    streamed = max(outside - after, max(layer_bytes, default=0) + calibration, after) + streamed_check
    device = device if device is not None else (param.device if not param.is_meta else torch.device("cpu"))
    return Peaks(in_memory_bytes=int(in_memory), streamed_bytes=int(streamed), checkpoint_bytes=int(checkpoint),
                 largest_layer_bytes=int(max(layer_bytes, default=0)), calibration_bytes=int(calibration),
                 available_bytes=available_memory(device))


def estimate_peaks(config: dict, samples: int, seq_len: int, *, gptq: bool = True, dtype_bytes: int = 2,
                   verify_tokens: int = 0) -> Peaks:
    """`plan_peaks` of the model a config.json describes (e.g. Llama-3.1-70B's), built on the meta device."""
    from llmquant.checkpoint.load import build_skeleton

    dtype = {1: torch.float8_e4m3fn, 2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
    model = build_skeleton(config, torch.float32 if dtype_bytes == 1 else dtype)
    return plan_peaks(model, samples, seq_len, gptq=gptq, elem=dtype_bytes, verify_tokens=verify_tokens,
                      device=torch.device("cpu"))
