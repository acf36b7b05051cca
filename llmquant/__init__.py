"""llmquant: quantize Hugging Face LLMs, save vLLM-loadable checkpoints, measure what it cost.

    import llmquant
    result = llmquant.quantize("HuggingFaceTB/SmolLM2-135M-Instruct", scheme="W8A8", output="out/")
    recipe = llmquant.Recipe.load("configs/quant/w4a16_gptq.yaml")   # or build_recipe(scheme=..., gptq=True)
    llmquant.quantize("org/model", recipe, load=llmquant.LoadOptions(revision="main"),
                      run=llmquant.RunOptions(output="out/"))
    loaded = llmquant.load_model("out/")          # our runtime, quantized layers
    llmquant.distill(teacher, student_layers=15, steps=500, output="student/")  # smaller, retrained
    llmquant.export("out/", "model.gguf")         # a GGUF file for llama.cpp, checked code for code
    llmquant.prune("org/model", pattern="2:4", output="pruned/")   # SparseGPT 2:4, a dense checkpoint

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
    "QuantArgs": "llmquant.config.args",
    "QuantScheme": "llmquant.config.args",
    "PRESETS": "llmquant.config.presets",
    "QuantizeResult": "llmquant.quant.pipeline.quantize",
    "quantize": "llmquant.quant.pipeline.quantize",
    "build_recipe": "llmquant.config.flags",
    "LoadOptions": "llmquant.config.options",
    "VerifyOptions": "llmquant.config.options",
    "RunOptions": "llmquant.config.options",
    "CalibrationConfig": "llmquant.config.recipe",
    "SmoothQuantConfig": "llmquant.config.recipe",
    "AWQConfig": "llmquant.config.recipe",
    "GPTQConfig": "llmquant.config.recipe",
    "MixedPrecisionConfig": "llmquant.config.recipe",
    "Recipe": "llmquant.config.recipe",
    "PushResult": "llmquant.hub.push",
    "push": "llmquant.hub.push",
    "build_model_card": "llmquant.hub.model_card",
    "DistillRecipe": "llmquant.distill.recipe",
    "DistillResult": "llmquant.distill.api",
}
__all__ = sorted(_EXPORTS) + ["__version__", "distill", "export", "prune"]


def __getattr__(name: str):
    if name in ("distill", "export", "prune"):  # callable packages: llmquant.distill(...), llmquant.prune(...)
        return import_module(f"llmquant.{name}")
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'llmquant' has no attribute {name!r}")
