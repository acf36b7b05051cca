"""llmquant export --format gguf, end to end on tiny models: our quantized folders carried over code for
code, read back by the gguf reader and by transformers' GGUF loader; float models quantized into
K-quant mixtures by GPTQ; refusals and atomic writes."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
import gguf.quants  # noqa: E402

from llmquant import load_model, quantize  # noqa: E402
from llmquant.config.recipe import CalibrationConfig  # noqa: E402
from llmquant.errors import InvalidConfigError, OutputExistsError  # noqa: E402
from llmquant.export.gguf.api import export  # noqa: E402
from llmquant.export.gguf.architectures import gguf_architecture  # noqa: E402
from llmquant.quant.linear import QuantizedLinear  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # after llmquant: tests/llmquant must not shadow it
from conftest import make_tiny_model_dir  # noqa: E402  (tests/conftest.py: the shared tiny-model builder)

SMALL = dict(num_samples=4, seq_len=64, progress=False, dtype="float32", verify=False)
# scheme flags -> the llama.cpp type that holds them exactly
LOSSLESS = {"Q4_0": dict(scheme="W4A16", group_size=32), "Q4_1": dict(scheme="W4A16_ASYM", group_size=32),
            "Q8_0": dict(scheme="W8A16", group_size=32)}


@pytest.fixture(scope="module")
def quantized_folders(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-sources")
    return {t: quantize(tiny_model_dir, output=root / t, **flags, **SMALL).output_dir for t, flags in LOSSLESS.items()}


@pytest.fixture(scope="module")
def ids(tiny_model_dir):
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)(topics["exceptions"], return_tensors="pt").input_ids[:, :64]


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("gguf_type", sorted(LOSSLESS))
def test_quantized_folder_is_carried_over_code_for_code(quantized_folders, tmp_path, gguf_type, ids):
    out = tmp_path / "model.gguf"
    result = export(quantized_folders[gguf_type], out, progress=False)
    assert result.file_type == gguf_type
    carried = [t for t in result.tensors if t.how == "carried over"]
    assert len(carried) == 14 and {t.type for t in carried} == {gguf_type}  # every decoder Linear
    assert "identical to ours" in result.verified
    assert result.scale_f16_change < 1e-2  # bf16 scales -> f16: exact in f16's normal range

    # Independently of our reader: llama.cpp's dequantization (gguf-py's port) of each block tensor
    # equals our layer's codes times the f16-stored scales, rows in llama.cpp's order.
    loaded = load_model(quantized_folders[gguf_type], dtype="float32")
    arch = gguf_architecture(loaded.model.config)
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    checked = moved = 0
    for name, module in loaded.model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        t = tensors[arch.tensor_name(name + ".weight")]
        assert t.tensor_type.name == gguf_type
        theirs = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)).reshape(
            module.out_features, module.in_features)
        q = module.int_weight().float().reshape(module.out_features, -1, 32)
        if gguf_type == "Q8_0":  # -128 is written as -127: llama.cpp's int8 kernels compute -127..127
            moved += int((q == -128).sum())
            q = q.clamp(min=-127)
        scale = module.weight_scale.float().half().float().unsqueeze(-1)
        zp = module.zero_point()
        if zp is None:
            ours = q * scale
        else:  # Q4_1 stores m = -s (z + 8) as f16 itself
            ours = q * scale + 8 * scale + (-module.weight_scale.float() * (zp.float() + 8)).half().float().unsqueeze(-1)
        ours = ours.reshape(module.out_features, module.in_features)
        order = arch.row_order(name + ".weight", module.out_features)
        if order is not None:
            ours = ours[order]
        assert torch.allclose(theirs, ours, rtol=0, atol=1e-6), name
        checked += 1
    assert checked == 14
    assert result.codes_moved == moved

    # transformers' GGUF loader reads the file; its logits match our runtime on the folder.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    assert _cosine(_logits(hf, ids), _logits(loaded.model, ids)) >= 0.999


def test_layout_gguf_cannot_hold_is_refused_or_requantized(tiny_model_dir, tmp_path, ids):
    folder = quantize(tiny_model_dir, scheme="W4A16", group_size=64, output=tmp_path / "g64", **SMALL).output_dir
    out = tmp_path / "g64.gguf"
    with pytest.raises(InvalidConfigError, match="--requantize") as info:
        export(folder, out, type="Q4_0", progress=False)
    assert "groups of 32" in str(info.value)
    assert not out.exists() and not list(tmp_path.glob(".g64.gguf*"))  # nothing half-written
    result = export(folder, out, type="Q4_0", requantize=True, progress=False)
    assert len(result.requantized) == 14
    requantized = [t for t in result.tensors if t.how == "requantized"]
    # The added error is measured: re-rounding INT4 g64 codes onto Q4_0 loses a little, not all.
    assert all(15 < t.weight_sqnr_db < 60 for t in requantized)
    with pytest.raises(OutputExistsError):
        export(folder, out, type="Q4_0", requantize=True, progress=False)


def test_float_model_gptq_into_k_quant_mixture(tmp_path_factory, tiny_tokenizer, ids):
    """Rows of 256 hold K-quants: Q4_K_M puts Q4_K and Q6_K where llama.cpp does, by GPTQ; the file
    loads in transformers and is closer to the float model than the same mixture plainly rounded."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("kquant")
    folder = make_tiny_model_dir(root / "wide", hidden=256, intermediate=512, layers=4, heads=4, kv_heads=2,
                                 tokenizer=tiny_tokenizer, dtype=torch.float32)
    reference = _logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), ids)
    kl = {}
    for method in ("gptq", "rtn"):
        out = root / f"{method}.gguf"
        result = export(folder, out, type="Q4_K_M", method=method, progress=False,
                        calibration=CalibrationConfig(num_samples=16, seq_len=128))
        types = {t.gguf_name: t.type for t in result.tensors}
        # llama.cpp's use_more_bits over 4 layers picks layers 2 and 3
        assert [types[f"blk.{i}.ffn_down.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
        assert [types[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
        assert types["blk.0.attn_q.weight"] == "Q4_K"
        assert types["token_embd.weight"] == "Q6_K"  # tied: the output's type
        assert {t.how for t in result.tensors if t.gguf_name.startswith("blk.") and t.type != "F32"} == \
            {"GPTQ" if method == "gptq" else "rounded"}
        assert "identical to ours" in result.verified
        hf = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
        kl[method] = _kl(reference, _logits(hf, ids))
    assert kl["gptq"] < kl["rtn"], kl


@pytest.mark.parametrize("file_type", ["F16", "BF16"])
def test_unquantized_file_types(tiny_model_dir, quantized_folders, tmp_path, ids, file_type):
    """F16/BF16 files of the float model hold its weights; of a quantized folder, its dequantized ones."""
    from transformers import AutoModelForCausalLM

    float_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for source, reference in ((tiny_model_dir, float_model),
                              (quantized_folders["Q4_0"], load_model(quantized_folders["Q4_0"], dtype="float32").model)):
        out = tmp_path / f"{file_type}-{source.name}.gguf"
        result = export(source, out, type=file_type, progress=False)
        assert set(result.type_counts()) == {file_type, "F32"} and "identical to ours" in result.verified
        if file_type == "F16":  # transformers' GGUF loader reads F16 (its BF16 support varies by version)
            hf = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
            assert _cosine(_logits(hf, ids), _logits(reference, ids)) >= 0.9999


def test_cli_writes_a_file_and_says_what_it_checked(quantized_folders, tmp_path, capsys):
    from llmquant.cli import main

    out = tmp_path / "cli.gguf"
    assert main(["export", str(quantized_folders["Q4_0"]), "--output", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert out.exists() and f"wrote {out}" in printed
    assert "Q4_0" in printed and "identical to ours" in printed
    assert main(["export", str(quantized_folders["Q4_0"]), "--output", str(tmp_path / "x.gguf"), "-q",
                 "--type", "Q9_9"]) != 0
    assert "unknown GGUF type" in capsys.readouterr().err


def _kl(reference, logits):
    p = torch.log_softmax(reference, -1)
    return (p.exp() * (p - torch.log_softmax(logits, -1))).sum(-1).mean().item()


def _llama_cpp_python():
    import importlib.util
    import os

    given = os.environ.get("LLMQUANT_LLAMA_CPP_PYTHON")
    return given or (sys.executable if importlib.util.find_spec("llama_cpp") else None)


@pytest.mark.skipif(_llama_cpp_python() is None,
                    reason="llama-cpp-python not importable (set LLMQUANT_LLAMA_CPP_PYTHON to a Python that has it)")
@pytest.mark.parametrize("gguf_type", ["Q4_0", "Q8_0"])
def test_llama_cpp_runs_the_file_like_our_runtime(quantized_folders, tmp_path, gguf_type):
    """Real llama.cpp on the written file against llmquant's runtime on the folder: same numbers, up to
    llama.cpp's 8-bit rounding of activations."""
    result = export(quantized_folders[gguf_type], tmp_path / "m.gguf", llama_cpp_python=_llama_cpp_python(),
                    progress=False)
    check = result.llama_cpp
    assert check["tokens"] == 256
    assert check["kl_mean"] < 1e-3 and check["top1_agreement"] > 0.95, check  # measured: KL 3e-6, top-1 99%
