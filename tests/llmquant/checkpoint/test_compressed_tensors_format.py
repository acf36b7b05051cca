"""Our tensors are bit-identical to what compressed-tensors' own compressors write (vLLM's input),
and transformers (with compressed-tensors installed) loads our folders to the same logits."""

import pytest
import torch
from torch import nn

from llmquant.config.args import QuantArgs
from llmquant.quant.linear import QuantizedLinear
from llmquant.config.presets import PRESETS

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme  # noqa: E402


def _scheme(name):
    s = PRESETS[name]
    if s.weights.strategy == "group":
        s = s.replace(weights=QuantArgs(**{**s.weights.to_dict(), "group_size": 64}))
    return s


@pytest.mark.parametrize("name", ["W8A16", "W4A16", "W4A16_ASYM", "W8A8", "FP8", "FP8_DYNAMIC", "FP8_W"])
def test_tensors_match_compressed_tensors_compressor(name):
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=False)
    scheme = _scheme(name)
    scale_dtype = torch.bfloat16 if scheme.format == "pack-quantized" else torch.float32
    ours = QuantizedLinear.from_float(lin, scheme, scale_dtype=scale_dtype, input_scale=0.1)
    ct_scheme = QuantizationScheme.model_validate(scheme.to_compressed_tensors(["Linear"]))
    state = {"weight": lin.weight.detach(), "weight_scale": ours.weight_scale}
    zp = ours.zero_point()
    if zp is not None:
        state["weight_zero_point"] = zp.to(torch.int8)
    compressor = BaseCompressor.load_from_registry(scheme.format)
    theirs = compressor.compress(state, ct_scheme)
    mine = ours.state_dict()
    for key, value in theirs.items():
        assert torch.equal(mine[key], value.to(mine[key].dtype)), key
    assert set(theirs) - {"weight_scale"} <= set(mine)


@pytest.mark.parametrize("scheme", ["W8A16", "W4A16", "W8A8", "FP8", "FP8_DYNAMIC", "FP8_W"])
def test_transformers_loads_our_folder_to_the_same_logits(tiny_model_dir, tmp_path, scheme):
    from transformers import AutoModelForCausalLM

    from llmquant import quantize

    result = quantize(tiny_model_dir, scheme=scheme, output=tmp_path / "q", verify=False, progress=False,
                      dtype="float32", num_samples=4, seq_len=64)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    ids = torch.arange(5, 69)[None]
    with torch.inference_mode():
        theirs = hf(ids).logits.double().flatten()
        ours = result.model(ids).logits.double().flatten()
    assert torch.nn.functional.cosine_similarity(theirs, ours, dim=0) > 0.999
