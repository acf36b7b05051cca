"""How closely a quantized (or distilled) model follows its base model, token by token.

    from llmquant.eval.agreement import agreement
    result = agreement("out-w4a16/", base=None, max_tokens=8192)   # base None: the demo model
    print(result.kl_mean, result.top1_agreement)

Perplexity alone hides damage: a model can lose on some tokens and win on others and end
with the same perplexity while its predictions moved a lot. Like llama.cpp's
`perplexity --kl-divergence`, this feeds both models the same windows (the perplexity
windows, `eval.windows`) and compares their next-token distributions at every scored position:

* KL divergence KL(P_base || P_model) = sum_v p_base(v) * (log p_base(v) - log p_model(v)),
  in nats, computed in float32 over the whole vocabulary; mean, median, p99 and max over tokens;
* top-1 agreement: the share of positions where both models' most likely token is the same;
* both models' perplexity on the same tokens, so the deltas come from one run.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm import tqdm

from llmquant.data.eval_data import EvalData
from llmquant.data.evaluation import describe_scored, scored_text
from llmquant.data.tokenize import tokenize_split
from llmquant.errors import InvalidConfigError
from llmquant.eval.local_model import DEFAULT_MAX_WINDOW, context_length, dtype_name, resolve_model
from llmquant.eval.scoring import accepts_logits_to_keep, model_device
from llmquant.eval.windows import batches_of_equal_shape, plan_windows


@dataclass
class AgreementResult:
    """What `agreement` measured, and exactly how (see `method`)."""

    kl_mean: float  # nats per scored token
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float  # share of scored positions, 0..1
    perplexity: float  # the model's, on the scored tokens
    base_perplexity: float  # the base model's, on the same tokens
    num_tokens_scored: int
    per_window_kl: list[float]  # mean KL of each window, in stream order
    per_window_top1: list[float]
    method: dict[str, Any]
    seconds: float
    model: str
    base: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def agreement(model: Any, base: Any = None, data: EvalData | None = None, *, base_revision: str | None = None,
              progress: bool = True, **options: Any) -> AgreementResult:
    """KL divergence and top-1 agreement of `model` against `base` on the text `data` selects.

    model, base: each a source for `llmquant.load_model` (None: the demo model), a
    `LoadedModel` or a `(model, tokenizer)` pair. Both must share a tokenizer: the windows are
    cut once, from the base model's tokens. `data` (or its fields as keyword `options`) means
    what it means in `eval.perplexity`; its loading options apply to both models, except its
    `revision`, which is the model's: the base's is `base_revision`.
    """
    data = EvalData.build(data, **options)
    text_split = scored_text(data)
    load = data.load_options()
    base_lm, base_tok, base_name = resolve_model(base, **{**load, "revision": base_revision})
    lm, tok, name = resolve_model(model, **load)
    check_same_tokenizer(tok, base_tok, name, base_name)
    context = min(c for c in (context_length(lm), context_length(base_lm), DEFAULT_MAX_WINDOW * 1024) if c)
    window = data.window
    if window is None:
        window = min(context, DEFAULT_MAX_WINDOW)
    elif window > context:
        raise InvalidConfigError(f"window {window} is longer than the models' context length ({context} tokens).")
    stride = data.stride if data.stride is not None else window
    batch_size = data.batch_size
    stream = tokenize_split(base_tok, text_split, max_tokens=data.max_tokens)
    windows = plan_windows(stream.num_tokens, window, stride)

    kl_all: list[torch.Tensor] = []
    per_window_kl: list[float] = []
    per_window_top1: list[float] = []
    nll_model = nll_base = 0.0
    agree = 0
    start = time.perf_counter()
    bar = tqdm(total=len(windows), desc="agreement", unit="window", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    with torch.inference_mode(), bar:
        for batch in batches_of_equal_shape(windows, batch_size):
            ids = torch.stack([stream.ids[w.begin:w.end] for w in batch])  # (B, T)
            n = batch[0].num_scored
            lp_base = scored_logprobs(base_lm, ids, n)  # (B, n, V) float32, on CPU
            lp_model = scored_logprobs(lm, ids, n)
            vocab = min(lp_base.shape[-1], lp_model.shape[-1])  # padded embedding rows are never targets
            lp_base, lp_model = lp_base[..., :vocab], lp_model[..., :vocab]
            kl = (lp_base.exp() * (lp_base - lp_model)).sum(-1).clamp_min(0.0)  # (B, n)
            same = lp_base.argmax(-1) == lp_model.argmax(-1)  # (B, n)
            targets = ids[:, -n:].unsqueeze(-1)
            nll_base -= float(lp_base.gather(-1, targets).double().sum())
            nll_model -= float(lp_model.gather(-1, targets).double().sum())
            agree += int(same.sum())
            kl_all.append(kl.flatten())
            per_window_kl.extend(float(row.double().mean()) for row in kl)
            per_window_top1.extend(float(row.double().mean()) for row in same)
            bar.update(len(batch))
    seconds = time.perf_counter() - start

    kl_tokens = torch.cat(kl_all).double()
    count = kl_tokens.numel()
    return AgreementResult(
        kl_mean=float(kl_tokens.mean()),
        kl_median=float(kl_tokens.median()),
        kl_p99=float(torch.quantile(kl_tokens, 0.99)) if count > 1 else float(kl_tokens[0]),
        kl_max=float(kl_tokens.max()),
        top1_agreement=agree / count,
        perplexity=_exp(nll_model / count),
        base_perplexity=_exp(nll_base / count),
        num_tokens_scored=count,
        per_window_kl=per_window_kl,
        per_window_top1=per_window_top1,
        method={
            "dataset": stream.dataset, "split": stream.split, "data": stream.description,
            "scored": describe_scored(stream),
            "num_tokens": stream.num_tokens, "max_tokens": data.max_tokens, "window": window, "stride": stride,
            "num_windows": len(windows), "batch_size": batch_size, "normalization": "token",
            "kl": "KL(P_base || P_model), nats, full vocabulary, float32",
            "dtype": dtype_name(lm),
            "base_dtype": dtype_name(base_lm),
            "device": str(model_device(lm)),
        },
        seconds=seconds,
        model=name,
        base=base_name,
    )


def scored_logprobs(model: torch.nn.Module, ids: torch.Tensor, num_scored: int) -> torch.Tensor:
    """Float32 log-probabilities (B, num_scored, V) predicting the last `num_scored` tokens."""
    keep = num_scored + 1
    kwargs: dict[str, Any] = {"use_cache": False}
    if accepts_logits_to_keep(type(model)):
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=ids.to(model_device(model)), **kwargs).logits[:, -keep:-1, :]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def check_same_tokenizer(tok, base_tok, name: str, base_name: str) -> None:
    """Refuse to compare models whose tokens do not mean the same thing."""
    probe = "Agreement needs one tokenizer: 12,345 tokens; ÅÄÖ — naïve café.\n\tdef f(x): return x**2"
    if len(tok) != len(base_tok) or tok(probe).input_ids != base_tok(probe).input_ids:
        raise InvalidConfigError(
            f"{name} and its base {base_name} use different tokenizers ({len(tok)} vs {len(base_tok)} tokens); "
            "KL divergence and top-1 agreement compare distributions over the same tokens. Compare perplexity or "
            "bits per byte instead."
        )


def summarize(result: AgreementResult) -> str:
    return (f"KL {result.kl_mean:.5f} nats/token (median {result.kl_median:.5f}, p99 {result.kl_p99:.4f}), "
            f"top-1 agreement {100 * result.top1_agreement:.2f}%, perplexity {result.perplexity:.4f} vs base "
            f"{result.base_perplexity:.4f}; {result.num_tokens_scored:,} tokens")


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")
