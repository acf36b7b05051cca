"""Architecture facts (registry.py), MoE experts as per-expert Linear layers (experts.py), the decoder stack
(layers.py) and SmoothQuant / AWQ mappings (mappings.py): what llmquant knows about model structure."""
