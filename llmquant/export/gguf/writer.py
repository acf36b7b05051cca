"""`export_gguf`: a loaded model (float, or our quantized folder) -> one llama.cpp GGUF file.

1. Every checkpoint tensor gets its llama.cpp name and a type from the file type's mixture
   (type_plan.py).
2. Weights get their codes: a quantized layer whose layout a llama.cpp type holds is carried over
   code for code (sources.py); a float weight is quantized into its type, by GPTQ on calibration
   text for the decoder layers (calibrated.py) or by rounding with the scale search; a quantized
   layout GGUF cannot hold is refused, or re-rounded from our dequantized weights with
   `requantize=True` (the added error is measured and reported).
3. Metadata, tokenizer and tensors are written with the `gguf` package's writer into a temporary
   file beside the output, renamed into place only when complete.
4. The file is read back (verify.py) and every code and scale compared with what was meant.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from llmquant.errors import InvalidConfigError, OutputExistsError
from llmquant.export.gguf.ggml_types import BLOCK_TYPES, block_type
from llmquant.export.gguf.quantize_tensor import TypedWeight, round_to_type
from llmquant.export.gguf.sources import HOLDABLE, SourceTensor, carry_over, lossless_type
from llmquant.export.gguf.type_plan import TensorSlot, check_file_type, plan_types
from llmquant.quant.primitives import sqnr_db


@dataclass
class TensorRecord:
    gguf_name: str
    source_name: str
    type: str
    shape: tuple[int, ...]
    how: str  # "carried over", "GPTQ", "rounded", "requantized", "float"
    weight_sqnr_db: float | None = None  # of the file's values against the source weights


@dataclass
class GGUFExportResult:
    path: Path
    file_type: str
    architecture: str
    tensors: list[TensorRecord]
    file_bytes: int = 0
    scale_f16_change: float = 0.0  # largest relative change of a carried-over scale or offset (f16 storage)
    codes_moved: int = 0  # carried-over INT8 codes of -128, written as -127 (llama.cpp's Q8_0 range)
    requantized: list[str] = field(default_factory=list)
    verified: str = ""  # what verification checked
    llama_cpp: dict | None = None

    def summary_lines(self) -> list[str]:
        counts = ", ".join(f"{n} {t}" for t, n in sorted(self.type_counts().items()))
        made: dict[str, int] = {}
        for t in self.tensors:
            made[t.how] = made.get(t.how, 0) + 1
        lines = [f"wrote {self.path}: {self.file_bytes / 2**20:.1f} MiB, {self.bits_per_weight():.2f} bits per weight, "
                 f"{self.architecture} ({self.file_type}: {counts})",
                 "tensors: " + ", ".join(f"{n} {how}" for how, n in made.items())]
        weights = [t for t in self.tensors if t.weight_sqnr_db is not None]
        if weights:
            worst = min(weights, key=lambda t: t.weight_sqnr_db)
            mean = sum(t.weight_sqnr_db for t in weights) / len(weights)
            lines.append(f"weight SQNR: mean {mean:.1f} dB, lowest {worst.weight_sqnr_db:.1f} dB ({worst.gguf_name}, "
                         f"{worst.type}, {worst.how})")
        if any(t.how == "carried over" for t in self.tensors):
            lines.append(f"carried over code for code; scales stored as f16 changed by at most "
                         f"{self.scale_f16_change:.2e} (relative)")
            if self.codes_moved:
                lines.append(f"{self.codes_moved:,} INT8 codes of -128 written as -127 (llama.cpp's Q8_0 kernels "
                             "compute -127..127); the SQNR above includes that change")
        if self.requantized:
            lines.append(f"requantized {len(self.requantized)} layers from their dequantized weights "
                         "(the SQNR above is against our dequantized weights)")
        if self.verified:
            lines.append(f"verified: {self.verified}")
        if self.llama_cpp:
            c = self.llama_cpp
            lines.append(f"llama.cpp vs llmquant on {c['tokens']} held-out tokens: KL {c['kl_mean']:.4f} nats/token "
                         f"(max {c['kl_max']:.3f}), top-1 agreement {c['top1_agreement']:.1%}")
        else:
            lines.append("llama.cpp check skipped: llama-cpp-python is not importable here "
                         "(--llama-cpp-python PYTHON points at an environment that has it)")
        return lines

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type] = counts.get(t.type, 0) + 1
        return counts

    def bits_per_weight(self) -> float:
        """File bytes of 2-D tensors x 8 / their element count (what llama.cpp calls BPW)."""
        bits = elems = 0
        for t in self.tensors:
            if len(t.shape) < 2:
                continue
            n = int(torch.Size(t.shape).numel())
            if t.type in BLOCK_TYPES:
                bt = block_type(t.type)
                bits += n // bt.block * bt.bytes_per_block() * 8
            else:
                bits += n * {"F32": 32, "F16": 16, "BF16": 16}[t.type]
            elems += n
        return bits / max(1, elems)


def default_file_type(tensors: list[SourceTensor]) -> str:
    """A quantized folder's own type when its layers share one lossless layout; Q4_K_M otherwise."""
    kinds = {lossless_type(s.layer) for s in tensors if s.layer is not None}
    if len(kinds) == 1 and None not in kinds:
        return kinds.pop()
    return "Q4_K_M"


def plan_file(model, arch, tensors: list[SourceTensor], file_type: str, calibrated: bool) -> dict[str, str]:
    """checkpoint name -> planned type, for the tensors llama.cpp wants."""
    slots, names = [], {}
    for s in tensors:
        if arch.skips(s.name):
            continue
        gname = arch.tensor_name(s.name)
        names[gname] = s.name
        slots.append(TensorSlot(gname, s.shape))
    plan = plan_types(slots, file_type, model.config.num_hidden_layers, calibrated=calibrated)
    return {names[g]: t for g, t in plan.items()}


def quantize_weights(model, tensors: list[SourceTensor], plan: dict[str, str], *, method: str, requantize: bool,
                     batches: Tensor | None, dampening: float, progress: bool, result: GGUFExportResult
                     ) -> dict[str, tuple[TypedWeight, str, float]]:
    """checkpoint name -> (typed weight, how it was made, its SQNR in dB against the weight it stands
    for: the float weight, or for a carried-over or requantized layer our dequantized one) for every
    tensor planned as a block type."""
    typed: dict[str, tuple[TypedWeight, str, float]] = {}
    refused = []
    for s in tensors:
        if s.layer is None or plan.get(s.name) not in BLOCK_TYPES:
            continue  # float tensors, and quantized layers the file type writes as float (F16 ...)
        if lossless_type(s.layer) is not None:
            weight, change, moved = carry_over(s.layer)
            result.scale_f16_change = max(result.scale_f16_change, change)
            result.codes_moved += moved
            typed[s.name] = (weight, "carried over", sqnr_db(s.layer.dequantized_weight(), weight.dequantized))
        elif requantize:
            ours = s.layer.dequantized_weight(torch.float32)
            weight = round_to_type(ours, block_type(plan[s.name]))
            typed[s.name] = (weight, "requantized", sqnr_db(ours, weight.dequantized))
            result.requantized.append(s.name)
        else:
            refused.append(f"{s.name} ({s.layer.scheme.describe()})")
    if refused:
        raise InvalidConfigError(
            f"{len(refused)} quantized layers use a layout GGUF cannot hold, e.g. {refused[0]}. GGUF holds "
            f"{HOLDABLE}: quantize with --group-size 32 for a lossless export, or pass --requantize to re-round "
            "these layers from their dequantized weights into the file type (the added error is reported).")
    floats = {s.name: s.tensor for s in tensors if s.layer is None and plan.get(s.name) in BLOCK_TYPES}
    if method == "gptq" and batches is not None:
        from llmquant.arch.layers import find_decoder_layers
        from llmquant.export.gguf.calibrated import gptq_model

        prefix, _ = find_decoder_layers(model)
        inside = {n[:-len(".weight")]: block_type(plan[n]) for n in floats
                  if n.startswith(prefix + ".") and n.endswith(".weight")}
        done = gptq_model(model, inside, batches, dampening=dampening, progress=progress)
        for module_name, (weight, sqnr) in done.items():
            typed[module_name + ".weight"] = (weight, "GPTQ", sqnr)
    for name, tensor in floats.items():
        if name not in typed:
            weight = round_to_type(tensor, block_type(plan[name]))
            typed[name] = (weight, "rounded", sqnr_db(tensor.float(), weight.dequantized))
            # The model in memory now computes what the file holds (the llama.cpp comparison runs it).
            tensor.copy_(weight.dequantized.to(tensor.dtype))
    return typed


def write_file(path: Path, arch, tokenizer, file_type: str, tensors: list[SourceTensor], plan: dict[str, str],
               typed: dict[str, tuple[TypedWeight, str, float]], result: GGUFExportResult,
               progress: bool) -> dict[str, object]:
    """Write the GGUF file to `path`; returns gguf name -> what was written (for verification)."""
    import gguf

    from llmquant.export.gguf.blocks import pack
    from llmquant.export.gguf.tokenizer import write_tokenizer

    writer = gguf.GGUFWriter(str(path), arch.name)
    # The folder's last component: llama.cpp and transformers both read meaning into some names
    # (a name containing "phi3" switches on Phi-3 vocabulary fixes), so never a whole path.
    writer.add_name(Path(str(getattr(arch.config, "_name_or_path", "") or arch.name)).name or arch.name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(_llama_file_type(file_type))
    arch.write_hparams(writer)
    write_tokenizer(writer, tokenizer, arch.config)
    written: dict[str, object] = {}
    for s in tensors:
        if arch.skips(s.name):
            continue
        gname = arch.tensor_name(s.name)
        rows = s.shape[0]
        order = arch.row_order(s.name, rows)
        t = plan[s.name]
        if s.name in typed:
            weight, how, sq = typed[s.name]
            codes, params = weight.codes, weight.params
            if order is not None:
                codes, params = codes[order], params.rows(order)
            raw = pack(codes, params)
            writer.add_tensor(gname, raw, raw_dtype=weight.type.gguf_type())
            written[gname] = (codes, params)
            result.tensors.append(TensorRecord(gname, s.name, weight.type.name, s.shape, how, sq))
            continue
        value = s.tensor if s.layer is None else s.layer.dequantized_weight(torch.float32)
        value = arch.float_transform(s.name, value.float())
        if order is not None:
            value = value[order]
        array = _float_array(value, t)
        writer.add_tensor(gname, array, raw_dtype=_float_gguf_type(t))
        written[gname] = array
        result.tensors.append(TensorRecord(gname, s.name, t, s.shape, "float"))
    for gname, value in arch.extra_tensors().items():
        array = value.float().numpy()
        writer.add_tensor(gname, array)
        written[gname] = array
        result.tensors.append(TensorRecord(gname, "(computed)", "F32", tuple(value.shape), "float"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()
    return written


def _float_gguf_type(t: str):
    import gguf

    return gguf.GGMLQuantizationType[t]


def _float_array(value: Tensor, t: str):
    import gguf

    if t == "F32":
        return value.numpy().astype("float32")
    if t == "F16":
        return value.numpy().astype("float16")
    return gguf.quants.quantize(value.numpy().astype("float32"), gguf.GGMLQuantizationType.BF16)


def _llama_file_type(file_type: str) -> int:
    import gguf

    if file_type == "F32":
        return int(gguf.LlamaFileType.ALL_F32)
    return int(gguf.LlamaFileType[f"MOSTLY_{file_type}"])


def temporary_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.partial-{os.getpid()}")


def check_output(output: Path, overwrite: bool) -> None:
    if output.suffix != ".gguf":
        raise InvalidConfigError(f"the output file should end in .gguf (llama.cpp and its tools look for it): {output}")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it.")
    if not output.parent.exists():
        output.parent.mkdir(parents=True, exist_ok=True)


def resolve_file_type(file_type: str | None, tensors: list[SourceTensor]) -> str:
    return check_file_type(file_type) if file_type else default_file_type(tensors)
