"""Measure saved model folders the same way in every benchmark that compares them: perplexity on
the first 16,384 tokens of the built-in corpus's held-out split (window 1024) and, optionally, of a
second text file, plus KL and top-1 agreement against the original on 2,048 held-out tokens.
Float32, through llmquant's runtime."""

from __future__ import annotations

from pathlib import Path

EVAL_TOKENS, WINDOW, AGREE_TOKENS, EVAL_DTYPE = 16384, 1024, 2048, "float32"


def number(v, digits: int = 0) -> str:
    """A table cell: the number rounded, or empty when there is none."""
    return "" if v is None else f"{v:.{digits}f}"


class FolderEvaluator:
    def __init__(self, original_dir: Path, second: Path | None = None):
        from llmquant import load_model
        from llmquant.data import evaluation_tokens
        from llmquant.quant.pipeline.verify import reference_logprobs

        self.second = second
        original = load_model(original_dir, dtype=EVAL_DTYPE)
        ids = evaluation_tokens(original.tokenizer, "builtin", max_tokens=AGREE_TOKENS)
        self.windows = ids[: AGREE_TOKENS // 512 * 512].reshape(-1, 512)
        self.reference = reference_logprobs(original.model, self.windows, progress=False)
        self.original = self.measure_loaded(original)

    def measure_loaded(self, loaded) -> dict:
        """ppl_corpus (and ppl_second with a second file), kl_mean, top1_agreement."""
        from llmquant.eval import perplexity
        from llmquant.quant.pipeline.verify import compare_to_reference

        out = {"ppl_corpus": perplexity(loaded, max_tokens=EVAL_TOKENS, window=WINDOW, progress=False).perplexity}
        if self.second is not None:
            out["ppl_second"] = perplexity(loaded, dataset=str(self.second), max_tokens=EVAL_TOKENS, window=WINDOW,
                                           progress=False).perplexity
        agree = compare_to_reference(loaded.model, self.windows, self.reference, progress=False)
        return {**out, "kl_mean": agree.kl_mean, "top1_agreement": agree.top1_agreement}

    def measure(self, folder: Path) -> dict:
        from llmquant import load_model

        return self.measure_loaded(load_model(folder, dtype=EVAL_DTYPE))
