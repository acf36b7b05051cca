"""`llmquant.export(...)`: a model or our quantized folder -> a verified GGUF file for llama.cpp.

    export("smol-w4a16-g32/", "smol.gguf")                     # lossless: our codes, as Q4_0
    export("HuggingFaceTB/SmolLM2-135M-Instruct", "smol-q4km.gguf", type="Q4_K_M")  # GPTQ into Q4_K_M
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

from llmquant.config.recipe import CalibrationConfig
from llmquant.errors import InvalidConfigError
from llmquant.export.gguf.type_plan import check_file_type
from llmquant.export.gguf.writer import (GGUFExportResult, check_output, plan_file, quantize_weights,
                                         resolve_file_type, temporary_path, write_file)

METHODS = ("gptq", "rtn")
CHECK_TOKENS = 256  # held-out tokens the llama.cpp comparison runs


def export(source=None, output: str | os.PathLike = "model.gguf", *, format: str = "gguf", type: str | None = None,
           method: str = "gptq", requantize: bool = False, calibration: CalibrationConfig | None = None,
           dampening: float = 0.01, dtype: str | torch.dtype = torch.float32, overwrite: bool = False,
           verify: bool = True, llama_cpp_python: str | None = None, revision: str | None = None,
           token: str | None = None, allow_pickle: bool = False,
           trust_remote_code: bool = False, progress: bool = True) -> GGUFExportResult:
    """Write `source` (as for `load_model`: a folder, Hub id, .gguf, or None for the demo model) to
    `output` as a GGUF file of file type `type` (Q4_0, Q4_K_M, Q8_0, F16, ...).

    Our quantized folders are carried over code for code where llama.cpp has the layout (INT4
    symmetric / asymmetric and INT8 symmetric, groups of 32 -> Q4_0 / Q4_1 / Q8_0); `type` then
    applies to the tensors the folder left in float (default: the folder's own type). Other layouts
    are refused unless `requantize`. Float models are quantized into `type` (default Q4_K_M) by
    `method`: "gptq" (calibrated on `calibration`'s text, layer by layer) or "rtn" (rounding with
    the scale search). With `verify`, the file is read back and compared code for code, and run in
    llama.cpp against our runtime when llama-cpp-python is importable (`llama_cpp_python`: the
    Python of another environment that has it). `dtype` is the compute dtype the model is loaded in
    for calibration (float32 by default: 4 bytes per parameter; "bfloat16" halves that for large
    models; GPTQ itself always works in float32, one weight at a time)."""
    from llmquant.export.gguf.architectures import gguf_architecture
    from llmquant.export.gguf.sources import model_tensors
    from llmquant.loading import load_model

    if format != "gguf":
        raise InvalidConfigError(f"unknown export format {format!r}; the formats are: gguf")
    if method not in METHODS:
        raise InvalidConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if type is not None:
        check_file_type(type)  # before any loading: a typo costs nothing
    output = Path(output)
    check_output(output, overwrite)
    t0 = time.perf_counter()
    loaded = load_model(source, revision=revision, token=token, dtype=dtype, device="cpu",
                        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    model = loaded.model
    arch = gguf_architecture(model.config)
    tensors = model_tensors(model)
    quantized = any(s.layer is not None for s in tensors)
    file_type = resolve_file_type(type, tensors)
    calibrated = method == "gptq" and not quantized
    plan = plan_file(model, arch, tensors, file_type, calibrated)
    result = GGUFExportResult(path=output, file_type=file_type, architecture=arch.name, tensors=[])
    batches = None
    if calibrated and any(t not in ("F32", "F16", "BF16") for t in plan.values()):
        from llmquant.data import calibration_batches

        cal = calibration or CalibrationConfig()
        batches = calibration_batches(loaded.tokenizer, cal.dataset, num_samples=cal.num_samples, seq_len=cal.seq_len,
                                      seed=cal.seed, text_field=cal.text_field, config_name=cal.config_name)
        _say(progress, f"GPTQ into {file_type} on {batches.shape[0]} x {batches.shape[1]} calibration tokens")
    typed = quantize_weights(model, tensors, plan, method=method, requantize=requantize, batches=batches,
                             dampening=dampening, progress=progress, result=result)
    partial = temporary_path(output)
    try:
        written = write_file(partial, arch, loaded.tokenizer, file_type, tensors, plan, typed, result, progress)
        if verify:
            from llmquant.export.gguf.verify import check_file

            result.verified = check_file(partial, arch.name, written)
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    result.file_bytes = output.stat().st_size
    if verify:
        from llmquant.export.gguf.llama_cpp_check import compare_with_llama_cpp, find_llama_cpp_python

        python = find_llama_cpp_python(llama_cpp_python)
        if python is not None:
            from llmquant.data import evaluation_tokens

            ids = evaluation_tokens(loaded.tokenizer, max_tokens=CHECK_TOKENS).tolist()
            result.llama_cpp = compare_with_llama_cpp(python, output, model, ids)
    _say(progress, f"wrote {output} in {time.perf_counter() - t0:.1f} s")
    return result


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr)
