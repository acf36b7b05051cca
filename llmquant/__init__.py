"""llmquant: quantize Hugging Face LLMs, save vLLM-loadable checkpoints, measure what it cost.

    import llmquant
    result = llmquant.quantize("HuggingFaceTB/SmolLM2-135M-Instruct", scheme="W8A8", output="out/")
    loaded = llmquant.load_model("out/")          # our runtime, quantized layers

Names are imported on first use, so `import llmquant` (and every CLI start) does not pay for
torch and transformers until a command needs them.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmquant")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

_EXPORTS = {
    "LLMQuantError": "llmquant.errors",
    "LoadedModel": "llmquant.loading",
    "ModelSource": "llmquant.loading",
    "load_model": "llmquant.loading",
    "QuantArgs": "llmquant.quant.args",
    "QuantScheme": "llmquant.quant.args",
    "PRESETS": "llmquant.quant.presets",
    "QuantizeResult": "llmquant.quant.quantize",
    "quantize": "llmquant.quant.quantize",
    "CalibrationConfig": "llmquant.quant.recipe",
    "Recipe": "llmquant.quant.recipe",
    "PushResult": "llmquant.hub.push",
    "push": "llmquant.hub.push",
    "build_model_card": "llmquant.hub.model_card",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llmquant' has no attribute {name!r}")
