"""What the engine calls to run the model: one step over new tokens, prefill or decode alike."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn


class Forward(ABC):
    """A model's forward pass as the engine uses it.

    A step takes the new tokens of every row of the batch (input_ids and position_ids (B, T);
    T > 1 for a prefill, T = 1 for a decode step), `attention_mask` (B, past + T) marking real
    tokens (rows are left-padded; None when every row is real), and the engine's KV cache
    (kv_cache.new_cache()), to which the new keys and values are appended. It returns float32
    logits (B, T, V) with `all_logits`, else those of the last position only, (B, 1, V).
    """

    name: str = "forward"

    @staticmethod
    @abstractmethod
    def supports(model: nn.Module) -> bool:
        """Whether this forward reproduces `model`'s own forward (decided from its structure)."""

    @abstractmethod
    def __call__(self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None, cache,
                 all_logits: bool) -> Tensor:
        """One step; see the class docstring."""
