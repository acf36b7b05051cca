"""The options of a quantize run that are not part of its recipe.

A recipe says what the checkpoint is (and is saved next to it); these say how this one run goes:
where the model comes from and how it is loaded, how the result is checked, where it is
written. Each is a small frozen dataclass that rejects unknown keys and wrong types, like the
recipe's sections.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmquant.config.fields import check_fields, check_mapping, choices
from llmquant.errors import InvalidConfigError
from llmquant.runtime import DTYPE_NAMES


@dataclass(frozen=True)
class LoadOptions:
    """How the source model is loaded (`llmquant.load_model`'s arguments)."""

    revision: str | None = None  # Hub branch, tag or commit (Hub ids only)
    dtype: str | torch.dtype = field(default="auto", metadata=choices(DTYPE_NAMES))  # compute dtype
    device: str | torch.device | None = None  # cpu, cuda, cuda:1 ...; None: cuda if present
    allow_pickle: bool = False  # allow .bin/.pt weights, which can run arbitrary code
    trust_remote_code: bool = False  # allow model code shipped in the repository

    def __post_init__(self) -> None:
        check_fields(self, "load")
        if isinstance(self.dtype, str) and self.dtype.lower() not in DTYPE_NAMES:
            raise InvalidConfigError(f"dtype must be one of {', '.join(DTYPE_NAMES)}; got {self.dtype!r}.")

    @classmethod
    def from_dict(cls, data: dict) -> "LoadOptions":
        return cls(**check_mapping(cls, data, "load"))

    def kwargs(self) -> dict:
        """The keyword arguments of `llmquant.load_model`."""
        return dict(revision=self.revision, dtype=self.dtype, device=self.device,
                    allow_pickle=self.allow_pickle, trust_remote_code=self.trust_remote_code)


@dataclass(frozen=True)
class VerifyOptions:
    """The check of the saved checkpoint against the original model on held-out text."""

    verify: bool = True  # reload the output and compare its predictions with the original's
    verify_tokens: int = 2048  # held-out tokens compared

    def __post_init__(self) -> None:
        check_fields(self, "verification")
        if self.verify_tokens < 1:
            raise InvalidConfigError(f"verify_tokens must be a positive number of tokens, got {self.verify_tokens}.")

    @classmethod
    def from_dict(cls, data: dict) -> "VerifyOptions":
        return cls(**check_mapping(cls, data, "verification"))


@dataclass(frozen=True)
class RunOptions:
    """Where the result goes, and how the run reports and resumes."""

    output: str | os.PathLike | None = None  # the checkpoint folder; None: keep the model in memory only
    overwrite: bool = False  # replace an existing output folder
    resume: bool = False  # continue an interrupted layer-by-layer (GPTQ) run
    push_to_hub: str | None = None  # then publish the folder to this Hub repository
    private: bool = False  # with push_to_hub: create the repository private
    progress: bool = True  # progress bars and messages on stderr
    # True: read the model one decoder layer at a time from its files (memory of one layer, not the
    # model); False: load it whole; None: stream when the plan says the whole model would not fit.
    stream: bool | None = None
    max_shard_size: str = "5GB"  # the checkpoint's shard size, as transformers spells it

    def __post_init__(self) -> None:
        check_fields(self, "run")
        if self.push_to_hub is not None and self.output is None:
            raise InvalidConfigError("push_to_hub needs an output folder: the checkpoint is saved, then pushed.")
        from llmquant.checkpoint.shard_writer import parse_size

        parse_size(self.max_shard_size)  # a bad size fails now, not after the work

    @classmethod
    def from_dict(cls, data: dict) -> "RunOptions":
        return cls(**check_mapping(cls, data, "run"))

    @property
    def max_shard_bytes(self) -> int:
        from llmquant.checkpoint.shard_writer import parse_size

        return parse_size(self.max_shard_size)

    @property
    def output_path(self) -> Path | None:
        return Path(self.output).expanduser().absolute() if self.output is not None else None
