"""Measuring what quantization cost and bought: perplexity, agreement with a base model,
perplexity through any OpenAI-compatible server, engine throughput, online load, suites.

`llmquant.eval.perplexity` is the function (the module of the same name is
`sys.modules["llmquant.eval.perplexity"]`; import its other names with `from llmquant.eval.perplexity import ...`).
The others (under `llmquant.eval`): `agreement.agreement`, `remote.remote_perplexity`,
`throughput.offline_throughput`, `loadgen.load_test`, `suite.run_suite`. Perplexity, agreement and
remote perplexity share one options object, `EvalData` (which text, which windows, how a model
given as a source is loaded).
"""

from llmquant.data.eval_data import EvalData
from llmquant.eval.perplexity import PerplexityResult, perplexity

__all__ = ["EvalData", "PerplexityResult", "perplexity"]
