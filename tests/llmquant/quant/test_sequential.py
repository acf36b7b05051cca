"""Layer-by-layer calibration: quantized inputs propagate, the plan refuses what cannot fit, runs resume."""

import dataclasses

import pytest
import torch

from llmquant.errors import InvalidConfigError
from llmquant.quant.algorithms.gptq import accumulate_hessian
from llmquant.quant.algorithms.gptq_handler import GPTQHandler
from llmquant.quant.linear import QuantizedLinear
from llmquant.quant.pipeline.memory_plan import check_plan, plan_sequential
from llmquant.quant.pipeline.plan import plan_layers
from llmquant.config.recipe import GPTQConfig, recipe_from_scheme
from llmquant.quant.pipeline.sequential import DequantizedOnce, dequantized_once, run_sequential
from llmquant.quant.pipeline.targets import linear_layers

SMALL = dict(num_samples=8, seq_len=64, verify=False, progress=False, dtype="float32")


@pytest.fixture()
def tiny(tiny_model_dir):
    from llmquant import load_model

    return load_model(tiny_model_dir, dtype="float32")


def _plans(net):
    rec = recipe_from_scheme("W4A16").with_overrides(weights={"group_size": 32})
    return plan_layers(rec, list(linear_layers(net, rec.targets, rec.ignore)))


def test_each_layer_is_calibrated_on_the_quantized_upstream(tiny):
    net = tiny.model
    batches = torch.randint(0, net.config.vocab_size, (6, 48), generator=torch.Generator().manual_seed(0))
    seen = {}

    class Recording(GPTQHandler):
        def finish(self, index, prefix, layer):
            seen.update({n: h.clone() for n, h in self.hessians().items() if n.endswith("q_proj")})
            super().finish(index, prefix, layer)

    float_h = _input_hessian(net, "model.layers.1.self_attn.q_proj", batches)
    run_sequential(net, batches, Recording(net, _plans(net), GPTQConfig(), torch.bfloat16), batch_size=4,
                   progress=False)
    assert isinstance(net.model.layers[0].self_attn.q_proj, QuantizedLinear)
    quant_h = _input_hessian(net, "model.layers.1.self_attn.q_proj", batches)
    used = seen["model.layers.1.self_attn.q_proj"]
    assert torch.allclose(used, quant_h, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(used, float_h, rtol=1e-3, atol=1e-3)  # the float model's would differ


@pytest.mark.parametrize("scheme", ["W4A16", "W4A16_ASYM", "W8A8", "FP8_DYNAMIC"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_propagation_stand_in_computes_what_the_quantized_layer_does(scheme, dtype):
    from llmquant.config.presets import preset

    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 128, generator=g))
        linear.bias.copy_(torch.randn(96, generator=g))
    chosen = preset(scheme)
    static = 3.0 if chosen.has_static_activations else None
    q = QuantizedLinear.from_float(linear, chosen, scale_dtype=torch.float32, input_scale=static).to(dtype)
    x = torch.randn(3, 200, 128, generator=g).to(dtype)  # 600 rows: the many-row (prefill) path
    with torch.inference_mode():
        expected = q(x)
        stand_in = DequantizedOnce(q)
        assert torch.equal(stand_in(x), expected)
        assert torch.equal(stand_in(x), expected)  # from the cached weight, too
    assert len(stand_in.weights) == 1


def test_propagation_pass_dequantizes_each_weight_once_and_puts_layers_back(tiny, monkeypatch):
    net = tiny.model
    batches = torch.randint(0, net.config.vocab_size, (16, 48), generator=torch.Generator().manual_seed(0))
    calls = []
    real = QuantizedLinear.dequantized_weight

    def counted(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(QuantizedLinear, "dequantized_weight", counted)
    run_sequential(net, batches, GPTQHandler(net, _plans(net), GPTQConfig(), torch.bfloat16), batch_size=4,
                   progress=False)
    quantized = [m for m in net.modules() if isinstance(m, QuantizedLinear)]
    last = [m for m in net.model.layers[-1].modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 7 * len(net.model.layers)
    # Four batches per layer, yet one dequantization per quantized Linear layer; the last layer's
    # outputs feed nothing, so it is not run again at all.
    assert len(calls) == len(quantized) - len(last)
    assert {id(m) for m in calls} == {id(m) for m in quantized} - {id(m) for m in last}
    assert not any(isinstance(m, DequantizedOnce) for m in net.modules())


def test_stand_ins_are_removed_even_when_the_pass_fails(tiny):
    layer = tiny.model.model.layers[0]
    linear = layer.self_attn.q_proj
    from llmquant.config.presets import preset

    layer.self_attn.q_proj = QuantizedLinear.from_float(linear, preset("W4A16"), scale_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="boom"):
        with dequantized_once(layer):
            assert isinstance(layer.self_attn.q_proj, DequantizedOnce)
            raise RuntimeError("boom")
    assert isinstance(layer.self_attn.q_proj, QuantizedLinear)


def _input_hessian(net, name, batches):
    state = {}

    def hook(module, args):
        state["h"], state["n"] = accumulate_hessian(state.get("h"), state.get("n", 0), args[0])

    handle = net.get_submodule(name).register_forward_pre_hook(hook)
    with torch.inference_mode():
        for chunk in batches.split(4):
            net(input_ids=chunk, use_cache=False)
    handle.remove()
    return state["h"]


def test_plan_counts_one_layer_of_inputs_and_refuses_what_does_not_fit(tiny):
    net = tiny.model
    names = {p.name for p in _plans(net)}
    plan = plan_sequential(net, 32, 128, 4, names)
    assert plan.inputs_bytes == 32 * 128 * 128 * 4  # samples x length x width x float32, one layer only
    assert plan.hessian_bytes == 4 * (6 * 128 ** 2 + 256 ** 2)  # q, k, v, o, gate, up read 128; down 256
    assert plan.fits and plan.seconds_estimate > 0
    assert "peak host RAM" in plan.describe()
    tight = dataclasses.replace(plan, available_bytes=int((plan.extra_bytes - plan.inputs_bytes / 2) / 0.85))
    fit = tight.max_samples()
    assert 0 < fit < 32 and dataclasses.replace(tight, samples=fit,
                                                inputs_bytes=fit * plan.inputs_bytes // 32).fits
    with pytest.raises(InvalidConfigError, match=f"--num-samples {fit} or fewer"):
        check_plan(tight)


def test_interrupted_run_resumes_at_the_layer_it_reached(tiny_model_dir, tmp_path):
    from llmquant import load_model, quantize

    full = quantize(tiny_model_dir, scheme="W4A16", group_size=32, gptq=True, output=tmp_path / "full", **SMALL)

    loaded = load_model(tiny_model_dir, dtype="float32")

    def interrupt(module, args, kwargs):  # Ctrl-C while layer 1 runs
        raise KeyboardInterrupt

    handle = loaded.model.model.layers[1].register_forward_pre_hook(interrupt, with_kwargs=True)
    # capture_first_inputs stops at layer 0, so the hook first fires in the layer-1 pass
    with pytest.raises(KeyboardInterrupt):
        quantize(loaded, scheme="W4A16", group_size=32, gptq=True, output=tmp_path / "q", **SMALL)
    handle.remove()
    assert not (tmp_path / "q").exists()
    assert (tmp_path / "q.resume" / "state.json").is_file()

    with pytest.raises(InvalidConfigError, match="other settings"):
        quantize(tiny_model_dir, scheme="W4A16", group_size=64, gptq=True, output=tmp_path / "q", resume=True,
                 **SMALL)
    resumed = quantize(tiny_model_dir, scheme="W4A16", group_size=32, gptq=True, output=tmp_path / "q",
                       resume=True, **SMALL)
    assert not (tmp_path / "q.resume").exists()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r.name for r in resumed.report.layers] == [r.name for r in full.report.layers]
