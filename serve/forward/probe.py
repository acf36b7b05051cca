"""The check a lean forward passes before the selector uses it: agreement with transformers.

Both forwards run the probe sentence (a prefill, then one decode step) and must agree on the
next-token distributions: mean KL divergence at most PROBE_MAX_KL nats/token. Real text, not
arbitrary ids: on a run of rare tokens the bf16 demo model is chaotic (transformers' own bf16
forward is KL 1.4 away from its float32 one there, measured), while on text both bf16 forwards
are KL 0.001 from float32.

Some models amplify rounding: with dynamic INT8 activations (W8A8) a value one bf16 step away
can land on the other side of an int8 rounding boundary, and two correct forwards that round in
a different order disagree by KL 0.02-0.03 on the demo model. So the bound rises to
NOISE_MARGIN times the model's own noise floor: how far transformers' forward moves when its
input embeddings move by about one bf16 step (`noise_floor`). A forward that computes something
else (a wrong norm epsilon, a missing mask) is off by far more than either.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmquant.serve import kv_cache
from llmquant.serve.forward.interface import Forward
from llmquant.serve.forward.transformers_forward import TransformersForward

PROBE_MAX_KL = 0.01
NOISE_MARGIN = 2.0
PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. Quantized models answer questions, "
              "write code and summarize documents while using less memory.")
PERTURBATION = 2.0 ** -7  # relative: one bf16 step for mantissas near 1, half a step near 2


def probe_ids(tokenizer) -> list[int]:
    """PROBE_TEXT tokenized (at least two tokens: a prefill and a decode step)."""
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    return ids if len(ids) >= 2 else [1, 2, 3, 4]


def probe_steps(ids: list[int], device) -> list[tuple[Tensor, Tensor]]:
    """(input ids, positions) of the two probe steps: the prefill, then one decode step."""
    prefill = torch.tensor([ids[:-1]], device=device)
    positions = torch.arange(prefill.shape[1], device=device)[None]
    return [(prefill, positions), (torch.tensor([ids[-1:]], device=device), positions[:, -1:] + 1)]


def forward_logprobs(forward: Forward, ids: list[int], device) -> list[Tensor]:
    """`forward`'s next-token log-probabilities at each probe step, on a fresh engine cache."""
    cache, out = kv_cache.new_cache(), []
    with torch.inference_mode():
        for step_ids, positions in probe_steps(ids, device):
            out.append(forward(step_ids, positions, None, cache, True).log_softmax(-1))
    return out


def transformers_logprobs(model: nn.Module, ids: list[int], perturb: bool = False) -> list[Tensor]:
    """transformers' log-probabilities at each probe step; with `perturb`, its input embeddings
    each moved by PERTURBATION in a fixed random direction."""
    embed = model.get_input_embeddings()
    handle = embed.register_forward_hook(_perturb) if perturb else None
    try:
        return forward_logprobs(TransformersForward(model), ids, embed.weight.device)
    finally:
        if handle is not None:
            handle.remove()


def max_mean_kl(reference: list[Tensor], other: list[Tensor]) -> float:
    """The larger of the steps' mean KL(reference || other); NaN counts as infinite."""
    worst = 0.0
    for ref, ours in zip(reference, other):
        kl = (ref.exp() * (ref - ours)).sum(-1).mean().item()
        worst = max(worst, kl if kl == kl else float("inf"))
    return worst


def probe_kl(forward: Forward, model: nn.Module, ids: list[int]) -> float:
    """The larger of the probe steps' mean KL divergence between transformers' forward and `forward`."""
    device = model.get_input_embeddings().weight.device
    return max_mean_kl(transformers_logprobs(model, ids), forward_logprobs(forward, ids, device))


def noise_floor(model: nn.Module, ids: list[int]) -> float:
    """KL between transformers' forward and itself with one-bf16-step input perturbations."""
    return max_mean_kl(transformers_logprobs(model, ids), transformers_logprobs(model, ids, perturb=True))


def _perturb(module, args, output: Tensor) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(0)
    signs = torch.randint(0, 2, output.shape, generator=gen).to(output.device) * 2 - 1
    return (output.float() * (1 + PERTURBATION * signs)).to(output.dtype)
