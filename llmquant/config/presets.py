"""Named schemes, spelled as llm-compressor users know them."""

from __future__ import annotations

from llmquant.errors import InvalidConfigError
from llmquant.config.args import FLOAT, INT, QuantArgs, QuantScheme

_INT8_CHANNEL = QuantArgs(num_bits=8, type=INT, strategy="channel")
_FP8_CHANNEL = QuantArgs(num_bits=8, type=FLOAT, strategy="channel")

PRESETS: dict[str, QuantScheme] = {
    # INT8 weights per output channel, activations in the model dtype.
    "W8A16": QuantScheme(weights=_INT8_CHANNEL),
    # INT4 weights per group of input columns; group size 128 unless the model's widths
    # need a smaller one (quantize() chooses, or the recipe says). Observers as measured on the
    # demo model (group 64, benchmarks/results/quality.md): symmetric groups waste part of
    # their grid, and the mse clipping search wins back some (+37.6% perplexity vs +41.0% with
    # minmax); asymmetric groups already fit their range, and clipping only hurts there
    # (minmax +30.3%, mse +36.2%).
    "W4A16": QuantScheme(weights=QuantArgs(num_bits=4, type=INT, strategy="group", group_size=128,
                                           observer="mse")),
    "W4A16_ASYM": QuantScheme(weights=QuantArgs(num_bits=4, type=INT, strategy="group", group_size=128,
                                                symmetric=False, observer="minmax")),
    # INT8 weights per channel + INT8 activations, dynamic per token (static per tensor with
    # activations: static).
    "W8A8": QuantScheme(weights=_INT8_CHANNEL,
                        input_activations=QuantArgs(num_bits=8, type=INT, strategy="token", dynamic=True)),
    # FP8 E4M3 weights per tensor + activations static per tensor from calibration.
    "FP8": QuantScheme(weights=QuantArgs(num_bits=8, type=FLOAT, strategy="tensor"),
                       input_activations=QuantArgs(num_bits=8, type=FLOAT, strategy="tensor")),
    # FP8 weights per channel + activations dynamic per token: no calibration data needed.
    "FP8_DYNAMIC": QuantScheme(weights=_FP8_CHANNEL,
                               input_activations=QuantArgs(num_bits=8, type=FLOAT, strategy="token",
                                                           dynamic=True)),
    # FP8 weight-only, per channel.
    "FP8_W": QuantScheme(weights=_FP8_CHANNEL),
}


# Schemes whose recipe runs SmoothQuant (alpha searched per layer) unless told not to. On the
# demo model it takes W8A8 from +2.8% to +0.75% perplexity and FP8_DYNAMIC from +3.2% to +2.5%
# (benchmarks/results/quality.md). Not FP8 (static): its single per-tensor weight scale pays for
# the range moved into the weights, and the result got worse (+2.5% -> +4.3%).
SMOOTHQUANT_BY_DEFAULT = frozenset({"W8A8", "FP8_DYNAMIC"})


def preset(name: str) -> QuantScheme:
    try:
        return PRESETS[name.upper()]
    except KeyError:
        raise InvalidConfigError(
            f"Unknown scheme {name!r}; valid schemes: {', '.join(PRESETS)}."
        ) from None
