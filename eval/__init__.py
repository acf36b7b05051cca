"""Measuring what quantization cost: perplexity now; task suites and throughput later.

`eval.perplexity` is the function (the module of the same name is
`sys.modules["eval.perplexity"]`; import its other names with `from eval.perplexity import ...`).
"""

from eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
