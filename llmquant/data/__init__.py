"""Text data for calibration and evaluation: the built-in corpus, local files, Hub datasets.

Calibration and evaluation splits of a dataset never share text (see `splits`); what a
measurement scores, and how, is an `EvalData` (see `eval_data`).
"""

from llmquant.data.calibration import calibration_batches
from llmquant.data.eval_data import EvalData
from llmquant.data.evaluation import describe_scored, evaluation_stream, evaluation_tokens, scored_stream, scored_text
from llmquant.data.sources import SUPPORTED_EXTENSIONS, DatasetSpec, resolve_dataset
from llmquant.data.splits import DEFAULT_EVAL_FRACTION, HELD_OUT, TextSplit, load_text_split, split_documents
from llmquant.data.tokenize import TokenStream

__all__ = [
    "DEFAULT_EVAL_FRACTION",
    "HELD_OUT",
    "SUPPORTED_EXTENSIONS",
    "DatasetSpec",
    "EvalData",
    "TextSplit",
    "TokenStream",
    "calibration_batches",
    "describe_scored",
    "evaluation_stream",
    "evaluation_tokens",
    "load_text_split",
    "resolve_dataset",
    "scored_stream",
    "scored_text",
    "split_documents",
]
