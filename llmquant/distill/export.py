"""Write a trained student: a float checkpoint (the house saver's tensors, atomically), or,
after quantization-aware training, a compressed-tensors checkpoint through `llmquant.quantize`
with the grid the weights trained against."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from llmquant.checkpoint.atomic import atomic_directory
from llmquant.checkpoint.save import checkpoint_tensors, write_weights


def write_float_checkpoint(model: nn.Module, tokenizer, folder: Path, storage_dtype: torch.dtype) -> None:
    """Weights in `storage_dtype` (tied ones once), config.json, generation config, tokenizer."""
    write_weights(checkpoint_tensors(model, storage_dtype), folder)
    config = model.config.to_dict()
    config["dtype"] = str(storage_dtype).removeprefix("torch.")
    config["architectures"] = [type(model).__name__]
    config.pop("_name_or_path", None)
    with open(folder / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_student(model: nn.Module, tokenizer, output, *, storage_dtype: torch.dtype, overwrite: bool,
                 files: dict[str, str]) -> Path:
    """A float student in `output` (atomic), with text files (report, recipe) beside it."""
    with atomic_directory(output, overwrite=overwrite) as tmp:
        write_float_checkpoint(model, tokenizer, tmp, storage_dtype)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(output).expanduser().absolute()


def export_quantized(model: nn.Module, tokenizer, output, *, qat, storage_dtype: torch.dtype, overwrite: bool,
                     progress: bool, files: dict[str, str]):
    """Quantize the QAT-trained student with `llmquant.quantize` (minmax observer, no SmoothQuant:
    either would move the weights off the grid they trained on) and save it; returns its result."""
    from llmquant.distill.fake_quant import QAT_OBSERVER, remove_fake_quant
    from llmquant.loading import LoadedModel, ModelSource
    from llmquant.quant.pipeline.quantize import quantize

    remove_fake_quant(model)
    model.eval()
    source = ModelSource(kind="local", name="distilled student", path=Path(output).expanduser().absolute(),
                         revision=None)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, source=source, source_dtype=storage_dtype,
                         quantization_config=None)
    result = quantize(loaded, output=output, scheme=qat.scheme, group_size=qat.group_size, symmetric=qat.symmetric,
                      observer=QAT_OBSERVER, smoothquant=False, overwrite=overwrite, progress=progress)
    # The checkpoint is complete and in place; the distillation report joins the quantization one.
    for name, text in files.items():
        (result.output_dir / name).write_text(text, encoding="utf-8")
    return result
