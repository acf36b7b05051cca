"""`EvalData`: the options every measurement shares, in one typed object.

Perplexity, agreement and remote perplexity all read some text, cut its tokens into sliding
windows, and (when given a model as a source) load that model. The options for those three
steps are the fields below; each measure takes an `EvalData` (or the same names as keyword
arguments, which `EvalData.build` turns into one), the CLI builds one from its flags and a suite
from each task's keys, so a new option is added here once.

    from llmquant.data import EvalData
    data = EvalData(dataset="notes.txt", max_tokens=8192, window=512)
    data = EvalData.build(data, dtype="float32")  # loading options by name, or load=LoadOptions(...)

Which part of the text is scored (`split`):

    None (default)  a named local file: all of it (you named it to score it); the built-in
                    corpus: its held-out evaluation split (last ~30%); a Hub dataset: its
                    "test" split, else "validation", else the held-out part of its one split
    "held-out"      the held-out evaluation split of a file or the built-in corpus too: the
                    text that calibration on the same source never sees
    "all"           every document
    anything else   a Hub split expression ("validation", "train[:10%]")
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llmquant.config.options import LoadOptions
from llmquant.errors import InvalidConfigError


@dataclass(frozen=True)
class EvalData:
    """Which text to score, how to cut it into windows, how to load a model given as a source."""

    # Which text (see `llmquant.data.sources` for what `dataset` may name).
    dataset: str | os.PathLike | None = None  # None or "builtin": the built-in corpus
    config_name: str | None = None  # Hub dataset configuration
    text_field: str = "text"  # column holding the text in .jsonl/.json/.parquet and Hub datasets
    split: str | None = None  # see the module docstring
    max_tokens: int | None = None  # score only the first tokens of the chosen text
    # How its tokens are cut into windows (see `llmquant.eval.windows`).
    window: int | None = None  # tokens per forward pass; None: the model's context, at most 1024
    stride: int | None = None  # tokens a window advances by; None: the window (no overlap)
    batch_size: int = 1  # windows per forward pass (remote: per request)
    # How a model given as a source is loaded (revision, dtype, device, allow_pickle,
    # trust_remote_code: `llmquant.load_model`'s options); unused for an already-loaded model.
    load: LoadOptions = field(default_factory=LoadOptions)

    DATA_KEYS: ClassVar[tuple[str, ...]] = ("dataset", "config_name", "text_field", "split", "max_tokens",
                                            "window", "stride", "batch_size")
    LOAD_KEYS: ClassVar[tuple[str, ...]] = tuple(f.name for f in dataclasses.fields(LoadOptions))

    def __post_init__(self) -> None:
        from llmquant.config.fields import check_fields

        check_fields(self, "")  # each field against its annotation: a wrong type names the field
        if not self.text_field:
            raise InvalidConfigError("text_field must be a non-empty column name (default: 'text').")
        self._check_numbers()

    def _check_numbers(self) -> None:
        """Reject impossible numbers before any data or model is loaded."""
        if self.max_tokens is not None and self.max_tokens < 2:
            raise InvalidConfigError(f"max_tokens must be at least 2 (one token to predict from, one to score), "
                                     f"not {self.max_tokens}.")
        if self.window is not None and self.window < 2:
            raise InvalidConfigError(f"window must be at least 2 tokens, not {self.window}.")
        if self.stride is not None and (self.stride < 1 or (self.window is not None and self.stride > self.window)):
            raise InvalidConfigError(
                f"stride must be at least 1 and at most the window ({self.window}), not {self.stride}: a stride "
                "larger than the window would skip tokens."
            )
        if self.batch_size < 1:
            raise InvalidConfigError(f"batch_size must be at least 1, not {self.batch_size}.")

    @classmethod
    def build(cls, data: EvalData | None = None, /, **options: Any) -> EvalData:
        """`data` (default: all defaults) with `options` set: any field name, and the loading
        options (revision, dtype, ...) by their own names. Unknown names are refused."""
        if data is not None and not isinstance(data, EvalData):
            raise InvalidConfigError(f"data must be an EvalData, got {type(data).__name__}; pass the options as "
                                     "keyword arguments instead.")
        from llmquant.config.fields import reject_unknown_keys

        reject_unknown_keys(options, (*cls.DATA_KEYS, *cls.LOAD_KEYS, "load"), "the evaluation options")
        base = data if data is not None else cls()
        if isinstance(options.get("load"), dict):  # as read from YAML
            options["load"] = LoadOptions.from_dict(options["load"])
        load = {k: options.pop(k) for k in cls.LOAD_KEYS if k in options}
        if load:
            options["load"] = dataclasses.replace(options.get("load", base.load), **load)
        return dataclasses.replace(base, **options) if options else base

    def load_options(self) -> dict[str, Any]:
        """The keyword arguments of `llmquant.load_model` for a model given as a source."""
        return self.load.kwargs()
