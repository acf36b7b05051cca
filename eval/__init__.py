"""Measuring what quantization cost and bought: perplexity, agreement with a base model,
perplexity through any OpenAI-compatible server, engine throughput, online load, suites.

`llmquant.eval.perplexity` is the function (the module of the same name is
`sys.modules["llmquant.eval.perplexity"]`; import its other names with `from llmquant.eval.perplexity import ...`).
The others (under `llmquant.eval`): `agreement.agreement`, `remote.remote_perplexity`,
`throughput.offline_throughput`, `loadgen.load_test`, `suite.run_suite`.
"""

from llmquant.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
