"""The engine's default limits, apart from the engine so that the CLI and the server can name them
without importing torch (a `llmquant serve` on a taken port fails before any heavy import)."""

DEFAULT_MAX_BATCH = 32  # sequences decoded together
DEFAULT_MAX_WAITING = 256  # requests queued beyond the batch before 429 busy
DEFAULT_MAX_PREFILL_TOKENS = 4096  # padded prompt tokens prefilled in one step
