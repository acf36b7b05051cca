"""transformers' own forward: correct for every model it loads, so the fallback of the selector."""

from __future__ import annotations

import inspect

from torch import Tensor, nn

from llmquant.serve.forward.interface import Forward


def cache_kwarg(model: nn.Module) -> str:
    """The keyword `model.forward` takes the KV cache by: transformers 5.24 renamed
    `past_key_values` to `cache` (the old name warns, then goes)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TransformersForward(Forward):
    name = "transformers forward"

    def __init__(self, model: nn.Module):
        self.model = model
        self.cache_kwarg = cache_kwarg(model)

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return True

    def __call__(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None, cache,
                 all_logits: bool) -> Tensor:
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         use_cache=True, logits_to_keep=0 if all_logits else 1, **{self.cache_kwarg: cache})
        return out.logits.float()
