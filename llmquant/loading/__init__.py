"""Turn a model source (Hub id, local folder, .gguf file, or the built-in demo) into a loaded model.

    from llmquant.loading import load_model
    loaded = load_model("HuggingFaceTB/SmolLM2-135M-Instruct", dtype="bfloat16")
    loaded.model, loaded.tokenizer, loaded.source.describe()

Every failure the user can fix raises an `llmquant.errors.LLMQuantError` subclass whose message
says what is wrong and what to do. Resolving a source needs neither torch nor transformers; they
are imported when a model is loaded.
"""

from llmquant.loading.load import LoadedModel, load_model
from llmquant.loading.sources import ModelSource, resolve_source

__all__ = ["LoadedModel", "ModelSource", "load_model", "resolve_source"]
