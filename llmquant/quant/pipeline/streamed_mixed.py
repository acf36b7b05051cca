"""Mixed precision's sensitivity pass with the model read one decoder layer at a time.

A layer's sensitivity is the mean KL of the model's output when only that layer is rounded
(algorithms/mixed.py). In memory, the hidden states entering each decoder layer are cached and
each layer's perturbed output runs through the rest of the stack. Streamed, the same arithmetic in
another order: for decoder layer k, the perturbed outputs of all its Linear layers are computed
together, then carried through layers k+1.. (each read once for all of them), the final norm and
the head; the float hidden states advance one layer. Memory: one layer, the head, and the windows'
hidden states once per Linear layer of one decoder layer. Reads: k+1.. for every k, i.e. about
half the model once per decoder layer — the price of not holding the model.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from llmquant.arch.layers import find_decoder_layers, layer_index
from llmquant.errors import InvalidConfigError
from llmquant.quant.algorithms.mixed import final_norm_and_head, mean_kl, round_in_place
from llmquant.quant.pipeline.sequential import LayerInputs, capture_first_inputs, run_layer
from llmquant.quant.pipeline.tail import tail_logits


def streamed_sensitivities(weights, model, plans, low, windows, progress: bool = True) -> dict[str, float]:
    """`layer_sensitivities` (algorithms/mixed.py) of a streamed model (`weights`: its LayerStream)."""
    prefix, layers = find_decoder_layers(model)
    norm, head = final_norm_and_head(model, prefix)
    if norm is None or head is None:
        raise InvalidConfigError("Mixed precision streamed needs a final norm beside the decoder stack and an output "
                                 "head; this model has none. Use --no-stream.")
    by_layer: list[list] = [[] for _ in layers]
    for plan in plans:
        if plan.scheme is None:
            continue
        if layer_index(plan.name, prefix) is None:
            raise InvalidConfigError(f"Mixed precision streamed measures layers inside the decoder stack; {plan.name} "
                                     "is outside it. --ignore it, or use --no-stream.")
        by_layer[layer_index(plan.name, prefix)].append(plan)
    before, after = weights.outside_keys(prefix)

    weights.load("", before)
    reference_inputs = capture_first_inputs(model, layers[0], windows, 1, weights.device)  # as reference_logprobs
    cached = capture_first_inputs(model, layers[0], windows, windows.shape[0], weights.device)  # as _TailRunner
    weights.release("", before)
    tuple_outputs = False
    for k in range(len(layers)):
        weights.load(f"{prefix}.{k}")
        tuple_outputs = run_layer(layers[k], reference_inputs, keep_outputs=True)
        weights.release(f"{prefix}.{k}")
    weights.load("", after)
    reference = []
    for (logits,) in tail_logits(model, layers, [reference_inputs], tuple_outputs):
        logits = logits[0].float()
        reference.append((torch.log_softmax(logits, dim=-1).to(torch.float16).cpu(),
                          logits.argmax(dim=-1).to(torch.int32).cpu()))

    out: dict[str, float] = {}
    for k in tqdm(range(len(layers)), desc="layer sensitivity (streamed)", unit="layer", disable=not progress):
        weights.load(f"{prefix}.{k}")
        perturbed: dict[str, LayerInputs] = {}
        for plan in by_layer[k]:
            weight = plan.module.weight
            saved = weight.data.clone()
            round_in_place(weight, low)
            try:
                perturbed[plan.name] = LayerInputs(list(cached.calls))
                run_layer(layers[k], perturbed[plan.name], keep_outputs=True)
            finally:
                weight.data = saved
        run_layer(layers[k], cached, keep_outputs=True)
        weights.release(f"{prefix}.{k}")
        if not perturbed:
            continue
        for m in range(k + 1, len(layers)):
            weights.load(f"{prefix}.{m}")
            for inputs in perturbed.values():
                run_layer(layers[m], inputs, keep_outputs=True)
            weights.release(f"{prefix}.{m}")
        with torch.inference_mode():
            for name, inputs in perturbed.items():
                out[name] = mean_kl(head(norm(inputs.hidden_states()[0])), reference)
    weights.release("", after)
    return out
