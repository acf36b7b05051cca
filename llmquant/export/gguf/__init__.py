"""GGUF export: llama.cpp-ready files from our quantized or float models."""
