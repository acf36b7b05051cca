"""How far a quantized model's predictions moved from the original's, on held-out windows.

Mean KL divergence KL(P_original || P_quantized) per token and top-1 agreement (how often
both models rank the same next token first): what llama.cpp's --kl-divergence reports.
Perplexity alone can hide damage (errors that cancel on average); these do not.

The original's log-probabilities are computed before quantization and kept in float16
(tokens x vocab x 2 bytes: 200 MB for 2,048 tokens of a 49k vocabulary), so the original
and the quantized model never need to be in memory together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm


@dataclass
class Agreement:
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    tokens: int
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"mean KL {self.kl_mean:.5f} nats/token, top-1 agreement {100 * self.top1_agreement:.2f}% "
                f"over {self.tokens} held-out tokens")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def reference_logprobs(model: nn.Module, windows: Tensor, progress: bool = True) -> list[tuple[Tensor, Tensor]]:
    """Per window: float16 log-softmax of the logits (L, V) and the exact top-1 token ids (L,),
    taken from float32 logits (float16 rounding could flip near-ties), on CPU."""
    out = []
    with torch.inference_mode():
        for w in tqdm(windows, desc="reference logits", unit="window", disable=not progress, leave=False):
            logits = model(input_ids=w[None].to(_device(model)), use_cache=False).logits[0].float()
            out.append((torch.log_softmax(logits, dim=-1).to(torch.float16).cpu(),
                        logits.argmax(dim=-1).to(torch.int32).cpu()))
    return out


def compare_to_reference(model: nn.Module, windows: Tensor, reference: list[tuple[Tensor, Tensor]],
                         progress: bool = True) -> Agreement:
    tally = _Tally()
    with torch.inference_mode():
        for w, (ref, ref_top1) in tqdm(list(zip(windows, reference)), desc="verifying", unit="window",
                                       disable=not progress, leave=False):
            logits = model(input_ids=w[None].to(_device(model)), use_cache=False).logits[0].float().cpu()
            tally.add(ref, ref_top1, logits)  # ref: renormalized there after its float16 storage
    return tally.result()


def compare_logits(pairs) -> Agreement:
    """The same measures from (original logits, quantized logits) pairs, one (L, V) pair per window,
    as a streamed run produces them (nothing stored in float16)."""
    tally = _Tally()
    for ref, logits in pairs:
        ref = ref.float().cpu()
        tally.add(ref, ref.argmax(-1), logits.float().cpu())
    return tally.result()


class _Tally:
    def __init__(self) -> None:
        self.kls: list[Tensor] = []
        self.agree = self.total = self.windows = 0

    def add(self, ref: Tensor, ref_top1: Tensor, logits: Tensor) -> None:
        logq = torch.log_softmax(logits, dim=-1)
        logp = torch.log_softmax(ref.float(), dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(dim=-1)  # (L,)
        self.kls.append(kl.clamp(min=0.0))
        self.agree += int((ref_top1 == logits.argmax(-1)).sum())
        self.total += logits.shape[0]
        self.windows += 1

    def result(self) -> Agreement:
        all_kl = torch.cat(self.kls)
        return Agreement(kl_mean=float(all_kl.mean()), kl_p99=float(torch.quantile(all_kl, 0.99)),
                         top1_agreement=self.agree / max(self.total, 1), tokens=self.total, windows=self.windows)
