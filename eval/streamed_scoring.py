"""Sliding-window NLL of a model read one decoder layer at a time, for models larger than memory.

The model comes from `load_model(stream=True)`: its parameters are on the meta device and its
`weights` (loading/layer_stream.py) read one module at a time from the safetensors files. The
windows and their batches are those of the in-memory run (`eval.windows`); what changes is the
order of the work:
  1. the modules before the decoder stack (the embedding) are read, the first decoder layer's
     inputs are captured for every window batch, and the embedding is let go;
  2. each decoder layer in turn is read, runs over every batch (its outputs replace its inputs)
     and is let go;
  3. the modules after the stack (final norm, output head) are read, and the model's own forward
     (`pipeline.tail.tail_logits`) turns each batch's last hidden states into logits, scored
     with `eval.scoring`'s arithmetic as soon as they exist.
Memory holds every batch's hidden states (windows x length x width), one decoder layer's weights
and one batch's logits; each layer runs the very computation a full forward runs, so the NLL is
the in-memory one (tests/eval/test_streamed_perplexity.py).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from llmquant.arch.layers import find_decoder_layers
from llmquant.errors import InvalidConfigError
from llmquant.eval.scoring import NllTally, WindowScores, logit_positions, token_nll, window_ids
from llmquant.eval.windows import Window, batches_of_equal_shape
from llmquant.loading.layer_stream import LayerStream
from llmquant.quant.pipeline.sequential import LayerInputs, capture_first_inputs, run_layer
from llmquant.quant.pipeline.tail import tail_logits


def is_streamed(model: Any) -> bool:
    """Whether `model` is a LoadedModel from `load_model(stream=True)` (weights still in the files)."""
    return getattr(model, "weights", None) is not None


def load_streamed(model: Any, **load_options: Any):
    """The streamed LoadedModel for `model`: a source (Hub id, folder, None for the demo model) is
    opened with `load_model(stream=True)`; a LoadedModel already streamed is used as is."""
    from llmquant.loading import LoadedModel, ModelSource, load_model

    if is_streamed(model):
        return model
    if isinstance(model, (LoadedModel, tuple, torch.nn.Module)):
        # Its weights are already in memory: streaming it would save nothing, and it has no files to read.
        raise InvalidConfigError(
            "A streamed run (--stream, stream=True) reads the model from its safetensors files one decoder layer "
            "at a time, so it needs the model's source (a folder or Hub id), not a model already loaded in "
            "memory. Pass the source, or evaluate the loaded model without stream.")
    if model is not None and not isinstance(model, (str, os.PathLike, ModelSource)):
        raise InvalidConfigError(f"model must be a source (Hub id, folder, or None for the demo model) for a "
                                 f"streamed run; got {type(model).__name__}.")
    return load_model(model, stream=True, **load_options)


def score_windows_streamed(model: torch.nn.Module, weights: LayerStream, ids: Tensor, windows: list[Window], *,
                           batch_size: int = 1, progress: bool = True) -> WindowScores:
    """`scoring.score_windows` for a streamed model (see the module docstring)."""
    prefix, layers = find_decoder_layers(model)
    before, after = weights.outside_keys(prefix)
    batches = batches_of_equal_shape(windows, batch_size)

    weights.load("", before)
    try:
        inputs = LayerInputs([])
        for batch in batches:  # one call per batch, as score_windows runs them
            inputs.calls += capture_first_inputs(model, layers[0], window_ids(ids, batch), len(batch),
                                                 weights.device).calls
    finally:
        weights.release("", before)

    tuple_outputs = False
    for k in tqdm(range(len(layers)), desc="perplexity (streamed)", unit="layer", file=sys.stderr,
                  disable=not progress, dynamic_ncols=True):
        weights.load(f"{prefix}.{k}")
        try:
            tuple_outputs = run_layer(layers[k], inputs, keep_outputs=True)
        finally:
            weights.release(f"{prefix}.{k}")

    with torch.inference_mode():
        # Only the positions whose logits are read go on to the output head (logits_to_keep does
        # the same in memory); the full-length states and the layers' other arguments are freed.
        for i, (batch, hidden) in enumerate(zip(batches, inputs.hidden_states())):
            inputs.calls[i] = ((hidden[:, -logit_positions(batch[0].num_scored):].clone(),), {})
    weights.load("", after)
    try:
        with torch.inference_mode(), NllTally(len(windows), progress) as tally:
            for batch, (logits,) in zip(batches, tail_logits(model, layers, [inputs], tuple_outputs)):
                tally.add(token_nll(logits, window_ids(ids, batch).to(logits.device), batch[0].num_scored))
    finally:
        weights.release("", after)
    return tally.scores()
