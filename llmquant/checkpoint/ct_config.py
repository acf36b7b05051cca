"""The `quantization_config` block of config.json, in the compressed-tensors format.

Writing: one config group per distinct scheme, `ignore` listing by name every Linear left in
full precision. Reading: the subset of the format llmquant can execute; anything else
(sparsity, transforms, KV-cache quantization, activation reordering, other formats) is
refused with a message, because loading it while ignoring those fields would give a model
that silently computes something else.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmquant.errors import CorruptCheckpointError, InvalidConfigError
from llmquant.config.args import QuantArgs, QuantScheme

QUANT_METHOD = "compressed-tensors"
SUPPORTED_FORMATS = ("pack-quantized", "int-quantized", "float-quantized")


@dataclass(frozen=True)
class ConfigGroup:
    name: str
    scheme: QuantScheme
    targets: tuple[str, ...]


def build_quantization_config(groups: list[tuple[QuantScheme, list[str]]], ignore: list[str]) -> dict:
    formats = {scheme.format for scheme, _ in groups}
    return {
        "quant_method": QUANT_METHOD,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": scheme.to_compressed_tensors(targets)
                          for i, (scheme, targets) in enumerate(groups)},
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def is_compressed_tensors(config: dict) -> bool:
    q = config.get("quantization_config") or {}
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def _refuse(what: str) -> InvalidConfigError:
    return InvalidConfigError(
        f"This compressed-tensors checkpoint uses {what}, which llmquant's runtime does not execute. "
        "Serve it with vLLM, or re-quantize the original model with llmquant.")


def parse_quantization_config(qcfg: dict) -> tuple[list[ConfigGroup], list[str]]:
    """(config groups, ignore list) from a checkpoint's quantization_config."""
    if qcfg.get("quant_method") != QUANT_METHOD:
        raise InvalidConfigError(f"Not a compressed-tensors config (quant_method={qcfg.get('quant_method')!r}).")
    top_format = qcfg.get("format") or "dense"
    if qcfg.get("sparsity_config"):
        raise _refuse("sparsity compression")
    if qcfg.get("transform_config"):
        raise _refuse("weight transforms")
    if qcfg.get("kv_cache_scheme"):
        raise _refuse("KV-cache quantization")
    status = qcfg.get("quantization_status", "compressed")
    if status != "compressed":
        raise _refuse(f"quantization_status={status!r} (only 'compressed' checkpoints are read)")
    raw_groups = qcfg.get("config_groups") or {}
    if not isinstance(raw_groups, dict) or not raw_groups:
        raise CorruptCheckpointError("The checkpoint's quantization_config has no config_groups.")
    groups = []
    for name, g in raw_groups.items():
        fmt = g.get("format") or top_format
        if fmt not in SUPPORTED_FORMATS:
            raise _refuse(f"the {fmt!r} format in {name}")
        if g.get("output_activations"):
            raise _refuse(f"output activation quantization in {name}")
        w = g.get("weights")
        if not w:
            raise _refuse(f"activation-only quantization in {name}")
        # "static"/"weight" ordering (llm-compressor's GPTQ default) only changed the rounding order:
        # groups stay consecutive columns and no g_idx is stored, so the layout is the plain one.
        if w.get("actorder") not in (None, False, "static", "weight"):
            raise _refuse(f"activation ordering (actorder={w.get('actorder')!r}) in {name}")
        if w.get("block_structure"):
            raise _refuse(f"block-wise weight scales in {name}")
        a = g.get("input_activations")
        scheme = QuantScheme(weights=QuantArgs.from_compressed_tensors(w),
                             input_activations=QuantArgs.from_compressed_tensors(a) if a else None)
        if scheme.format != fmt:
            raise _refuse(f"{scheme.describe()} stored as {fmt!r} in {name}")
        targets = g.get("targets") or []
        groups.append(ConfigGroup(name=name, scheme=scheme, targets=tuple(targets)))
    return groups, list(qcfg.get("ignore") or [])
