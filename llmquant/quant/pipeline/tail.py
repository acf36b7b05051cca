"""The end of a causal LM run from the hidden states its last decoder layer produced: the model's
own forward does it (final norm, output head, any logit soft-capping), with the embedding and
the decoder layers stood in for, so no model family's tail is written out here.

A streamed run (pipeline/streamed.py, eval's streamed perplexity) holds the last layer's outputs
for each window; `tail_logits` turns them into logits, one window batch at a time.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from llmquant.quant.pipeline.targets import set_submodule


class _ZeroEmbedding(nn.Module):
    """Stands in for the input embedding (which may be on the meta device): zeros of its output
    shape, replaced by the stored hidden states before the first (stand-in) layer."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.width, self.dtype, self.device = width, dtype, device

    def forward(self, input_ids: Tensor) -> Tensor:
        return torch.zeros(*input_ids.shape, self.width, dtype=self.dtype, device=self.device)


class _Passthrough(nn.Module):
    """Stands in for a decoder layer: returns its hidden states unchanged, in the layer's output form."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


def tail_logits(model: nn.Module, layers: nn.ModuleList, streams: list, tuple_outputs: bool,
                modules: list[dict] | None = None) -> Iterator[tuple[Tensor, ...]]:
    """For each call i of the `streams` (sequential.LayerInputs holding the last layer's outputs, with
    the same calls): the model's logits (batch, length, vocab) from each stream's hidden states of
    call i, computed by the model's forward. One call's logits are held at a time. `modules[j]`
    ({name: module}) are put in place for stream j's forward (e.g. the original lm_head for the
    original's stream); the last stream's stay in place."""
    embed_owner, embed_attr = _owner_of(model, model.get_input_embeddings())
    originals = list(layers)
    hidden0 = streams[0].hidden_states()[0]
    stand_in = _ZeroEmbedding(hidden0.shape[-1], hidden0.dtype, hidden0.device)
    current: dict = {}
    first = _Passthrough(tuple_outputs)
    handle = first.register_forward_pre_hook(lambda m, args: (current["hidden"],) + tuple(args[1:]))
    embedding = getattr(embed_owner, embed_attr)
    setattr(embed_owner, embed_attr, stand_in)
    for i in range(len(layers)):
        layers[i] = first if i == 0 else _Passthrough(tuple_outputs)
    try:
        with torch.inference_mode():
            for hidden_states in zip(*(s.hidden_states() for s in streams)):
                out = []
                for j, hidden in enumerate(hidden_states):
                    for name, module in (modules[j] if modules else {}).items():
                        set_submodule(model, name, module)
                    current["hidden"] = hidden
                    ids = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
                    out.append(model(input_ids=ids, use_cache=False).logits)
                yield tuple(out)
    finally:
        handle.remove()
        setattr(embed_owner, embed_attr, embedding)
        for i, layer in enumerate(originals):
            layers[i] = layer


def _owner_of(model: nn.Module, module: nn.Module) -> tuple[nn.Module, str]:
    for name, m in model.named_modules():
        if m is module:
            owner_name, _, attr = name.rpartition(".")
            return (model.get_submodule(owner_name) if owner_name else model), attr
    raise ValueError("the input embedding is not a submodule of the model")
