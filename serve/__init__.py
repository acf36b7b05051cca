"""Serving llmquant checkpoints through an OpenAI-compatible HTTP API (`llmquant serve`).

Not part of this release yet: today a quantized folder is served with vLLM (it reads the
compressed-tensors format) or run in Python through `llmquant.load_model`.
"""
