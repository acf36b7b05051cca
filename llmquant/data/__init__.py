"""Text data for calibration and evaluation: the built-in corpus, local files, Hub datasets.

Calibration and evaluation splits of a dataset never share text (see `splits`).
"""

from llmquant.data.calibration import calibration_batches
from llmquant.data.evaluation import evaluation_stream, evaluation_tokens
from llmquant.data.sources import SUPPORTED_EXTENSIONS, DatasetSpec, resolve_dataset
from llmquant.data.splits import DEFAULT_EVAL_FRACTION, TextSplit, load_text_split, split_documents
from llmquant.data.tokenize import TokenStream

__all__ = [
    "DEFAULT_EVAL_FRACTION",
    "SUPPORTED_EXTENSIONS",
    "DatasetSpec",
    "TextSplit",
    "TokenStream",
    "calibration_batches",
    "evaluation_stream",
    "evaluation_tokens",
    "load_text_split",
    "resolve_dataset",
    "split_documents",
]
