"""Write models in the formats other runtimes load: GGUF for llama.cpp, Ollama and LM Studio.

    import llmquant
    result = llmquant.export("smol-g32/", "smol-q4_0.gguf")                # our codes, as Q4_0
    result = llmquant.export("org/model", "model-q4km.gguf", type="Q4_K_M")  # GPTQ into Q4_K_M

See `llmquant.export.gguf.api.export` for the arguments, and docs/gguf.md.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    """`llmquant.export` is both this package and the function `llmquant.export(...)` (as
    `llmquant.distill` is): Python binds a subpackage to its parent's attribute of the same name."""

    def __call__(self, *args, **kwargs):
        from llmquant.export.gguf.api import export

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
