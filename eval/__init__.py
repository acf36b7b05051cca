"""Measuring what quantization cost and bought: perplexity, agreement with a base model,
perplexity through any OpenAI-compatible server, engine throughput, online load, suites.

`eval.perplexity` is the function (the module of the same name is
`sys.modules["eval.perplexity"]`; import its other names with `from eval.perplexity import ...`).
The others: `eval.agreement.agreement`, `eval.remote.remote_perplexity`,
`eval.throughput.offline_throughput`, `eval.loadgen.load_test`, `eval.suite.run_suite`.
"""

from eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
