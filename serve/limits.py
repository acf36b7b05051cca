"""The engine's default limits, apart from the engine so that the CLI and the server can name them
without importing torch (a `llmquant serve` on a taken port fails before any heavy import)."""

DEFAULT_MAX_BATCH = 32  # sequences decoded together
DEFAULT_MAX_WAITING = 256  # requests queued beyond the batch before 429 busy
# Padded prompt tokens computed per engine step: a longer prompt is prefilled in chunks of this
# size with a decode step of the running batch between chunks. On a CPU a 1024-token chunk of a
# small model takes a few tenths of a second (the running streams' longest pause) and holds eight
# 128-token chat prompts arriving together, which then get their first tokens after one pass
# instead of two with a decode step between (demo model, W4A16, 8 streams: time to first token p99
# 436 ms with 512-token chunks, benchmarks/serving.py); a GPU takes far more tokens in the same time.
DEFAULT_MAX_PREFILL_TOKENS_CPU = 1024
DEFAULT_MAX_PREFILL_TOKENS_GPU = 4096
# Tokens of prompt keys and values kept for prompts that start the same way (chat system
# prompts): 8192 tokens are 190 MB for SmolLM2-135M in bf16 (23 KB a token), 1 GB for an 8B
# Llama (128 KB a token).
DEFAULT_PREFIX_CACHE_TOKENS = 8192


def default_max_prefill_tokens(device_type: str) -> int:
    return DEFAULT_MAX_PREFILL_TOKENS_CPU if device_type == "cpu" else DEFAULT_MAX_PREFILL_TOKENS_GPU
