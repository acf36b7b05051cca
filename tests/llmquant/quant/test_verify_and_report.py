"""Verification metrics and the per-layer report."""

import json

import pytest
import torch

from llmquant.kernels.registry import Int4PackCpu, select_kernel
from llmquant.quant.pipeline.report import LayerReport, QuantReport
from llmquant.quant.pipeline.verify import compare_to_reference, reference_logprobs


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_a_model_agrees_perfectly_with_itself(tiny):
    windows = torch.randint(0, tiny.config.vocab_size, (2, 32))
    ref = reference_logprobs(tiny, windows, progress=False)
    agree = compare_to_reference(tiny, windows, ref, progress=False)
    assert agree.top1_agreement == 1.0 and agree.tokens == 64
    assert agree.kl_mean < 1e-4  # only float16 storage of the reference


def test_kl_matches_a_hand_computation(tiny):
    windows = torch.randint(0, tiny.config.vocab_size, (1, 16))
    ref = reference_logprobs(tiny, windows, progress=False)
    with torch.no_grad():
        tiny.lm_head.weight.mul_(1.5)  # sharpen: a different distribution
        try:
            agree = compare_to_reference(tiny, windows, ref, progress=False)
            logq = torch.log_softmax(tiny(windows).logits[0].float(), -1)
        finally:
            tiny.lm_head.weight.div_(1.5)
    logp = torch.log_softmax(ref[0][0].float(), -1)
    expected = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    assert agree.kl_mean == pytest.approx(expected, rel=1e-4)
    assert agree.kl_mean > 1e-3


def test_report_orders_worst_first_and_writes_both_files(tmp_path):
    report = QuantReport(source={"name": "m"}, recipe={"quantize": {"scheme": "W8A8"}})
    report.layers = [
        LayerReport("good", 8, 8, "s", weight_sqnr_db=40.0, activation_sqnr_db=35.0, activation_clip_pct=0.0),
        LayerReport("bad_activations", 8, 8, "s", weight_sqnr_db=41.0, activation_sqnr_db=12.0,
                    activation_clip_pct=1.5),
        LayerReport("bad_weights", 8, 8, "s", weight_sqnr_db=20.0),
    ]
    report.kept_full_precision = {"odd": "width 96 not a multiple of group size 64"}
    assert [r.name for r in report.worst_first()] == ["bad_activations", "bad_weights", "good"]
    report.write(tmp_path)
    data = json.loads((tmp_path / "quantization_report.json").read_text())
    assert data["layers"][0]["name"] == "bad_activations"
    assert data["summary"]["activation_sqnr_db_min"] == 12.0
    md = (tmp_path / "quantization_report.md").read_text()
    assert md.index("bad_activations") < md.index("| good |")
    assert "width 96" in md
    lines = report.summary_lines()
    assert "bad_activations: weight 41.0 dB, activations 12.0 dB, 1.5000% of calibration values clipped" in lines[4]


def test_a_kernel_that_disagrees_with_the_reference_is_not_used(monkeypatch, caplog):
    from llmquant.config.args import QuantArgs, QuantScheme
    from llmquant.quant.linear import QuantizedLinear

    lin = torch.nn.Linear(128, 64, bias=False)
    q = QuantizedLinear.from_float(lin, QuantScheme(QuantArgs(num_bits=4, strategy="group", group_size=32)),
                                   scale_dtype=torch.float32)
    # Fault injection: a torch build whose int4 kernel returns wrong numbers.
    monkeypatch.setattr(Int4PackCpu, "__call__", lambda self, x: torch.zeros(x.shape[0], 64))
    x = torch.randn(2, 128)
    with caplog.at_level("WARNING"):
        y = q(x)
    assert select_kernel(q, x).name == "dequant"
    assert "int4pack_cpu unavailable" in caplog.text
    assert torch.allclose(y, q.reference_forward(x), atol=1e-5)
