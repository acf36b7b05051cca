"""Serving: one generation engine and the OpenAI-compatible HTTP API over it.

    from llmquant.serve import Engine, SamplingParams, create_app, serve
    engine = Engine(llmquant.load_model("out/"))            # continuous batching, its own thread
    for event in engine.generate("Hello", SamplingParams(max_tokens=20)): print(event.text, end="")
    serve("out/", port=8000)                                # what `llmquant serve out/` runs

Files: engine.py (batching loop), prefill.py (prefill groups, chunked), prefix_cache.py (prompt
KV reused across requests), kv_cache.py, limits.py, sampling.py, detokenizer.py, events.py;
forward/ (the model forward the engine runs: one interface, chosen per model by forward/select.py);
app.py (routes), protocol.py (request bodies), completions.py / chat.py (responses),
choices.py / fanout.py (shared plumbing), api_errors.py, metrics.py; server.py (uvicorn,
graceful shutdown), setup_thread.py (model and engine built in a thread that ends: why, inside);
vllm_backend.py (`--backend vllm`).
"""

from __future__ import annotations

__all__ = ["Engine", "SamplingParams", "TokenEvent", "create_app", "serve"]


def __getattr__(name: str):
    # Lazy: `import llmquant.serve` must not pull in torch, transformers or FastAPI until used.
    if name == "Engine":
        from llmquant.serve.engine import Engine

        return Engine
    if name == "SamplingParams":
        from llmquant.serve.sampling import SamplingParams

        return SamplingParams
    if name == "TokenEvent":
        from llmquant.serve.events import TokenEvent

        return TokenEvent
    if name == "create_app":
        from llmquant.serve.app import create_app

        return create_app
    if name == "serve":
        from llmquant.serve.server import serve

        return serve
    raise AttributeError(f"module 'llmquant.serve' has no attribute {name!r}")
