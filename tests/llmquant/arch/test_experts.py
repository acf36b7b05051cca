"""MoE experts split into per-expert Linear layers: the same function, the checkpoint's tensors,
and calibration statistics from routed tokens with a fallback to every token."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from llmquant.arch.experts import LinearExperts, linearize
from llmquant.arch.registry import model_spec, to_checkpoint_name
from llmquant.quant.pipeline.expert_calibration import ExpertCalibration

MOE = ("mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3", "qwen2_moe", "olmoe")


def _float_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", MOE)
def test_split_experts_compute_the_same_function(arch, architecture_dir):
    model = _float_model(architecture_dir(arch))
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(ids).logits
        assert linearize(model, model_spec(model).experts) == sum(
            1 for m in model.modules() if isinstance(m, LinearExperts))
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", [a for a in MOE if a != "gpt_oss"])
def test_each_expert_projection_is_the_checkpoints_tensor(arch, architecture_dir):
    """Split in memory, each projection equals the tensor the source checkpoint stores under its name."""
    folder = architecture_dir(arch)
    model = _float_model(folder)
    spec = model_spec(model)
    linearize(model, spec.experts)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
        checked = 0
        for name, experts in model.named_modules():
            if not isinstance(experts, LinearExperts):
                continue
            for e in range(len(experts)):
                for proj in experts[e].projection_names:
                    key = to_checkpoint_name(f"{name}.{e}.{proj}.weight", spec)
                    assert key in stored
                    torch.testing.assert_close(experts[e].get_submodule(proj).weight, f.get_tensor(key).float())
                    checked += 1
    assert checked == 3 * 4 * sum(isinstance(m, LinearExperts) for m in model.modules())


def test_gpt_oss_gate_and_up_are_de_interleaved(architecture_dir):
    """gpt-oss stores [hidden, 2 x inter] with gate and up interleaved (g0, u0, g1, u1, ...)."""
    model = _float_model(architecture_dir("gpt_oss"))
    fused = model.model.layers[0].mlp.experts
    gate_up, bias = fused.gate_up_proj.detach().clone(), fused.gate_up_proj_bias.detach().clone()
    linearize(model, model_spec(model).experts)
    expert = model.model.layers[0].mlp.experts[1]
    torch.testing.assert_close(expert.gate_proj.weight, gate_up[1, :, 0::2].t())
    torch.testing.assert_close(expert.up_proj.weight, gate_up[1, :, 1::2].t())
    torch.testing.assert_close(expert.up_proj.bias, bias[1, 1::2])


def test_rarely_routed_experts_fall_back_to_every_token(architecture_dir):
    model = _float_model(architecture_dir("mixtral"))
    linearize(model, model_spec(model).experts)
    experts = model.model.layers[0].mlp.experts
    tokens, hidden = 10, model.config.hidden_size
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([[1, 2]] * 6 + [[2, 3]] * 4)  # expert 0 never chosen, expert 3 four times
    weights = torch.full((tokens, 2), 0.5)
    calibration = ExpertCalibration(model.model.layers[0], "layer.", "routed", min_tokens=5, total_tokens=tokens)
    seen: dict[int, int] = {}

    def count(expert: int):
        return lambda module, args: seen.__setitem__(expert, seen.get(expert, 0) + args[0].shape[0])

    hooks = [experts[e].w1.register_forward_pre_hook(count(e)) for e in range(4)]
    with torch.inference_mode():
        routed = experts(x, index, weights)
        assert seen == {1: 6, 2: 10, 3: 4}
        again = calibration.fallback()
        assert again == {f"layer.mlp.experts.{e}.{p}" for e in (0, 3) for p in ("w1", "w3", "w2")}
        seen.clear()
        every = experts(x, index, weights)
    for h in hooks:
        h.remove()
    calibration.finish()
    assert seen == {0: 10, 1: 6, 2: 10, 3: 10}  # the fallback experts saw every token
    torch.testing.assert_close(every, routed)  # and the output still sums routed contributions only
    assert calibration.routed["layer.mlp.experts.0.w1"] == 0 and calibration.routed["layer.mlp.experts.3.w2"] == 4
    assert "statistics from all 10" in calibration.note("layer.mlp.experts.0.w1")
    assert experts.all_tokens == set() and experts.routed_tokens is None


def test_gptq_notes_experts_calibrated_on_every_token(architecture_dir, tmp_path):
    """With a threshold above what any expert is routed, every expert's Hessian uses every token."""
    from llmquant import quantize

    result = quantize(architecture_dir("mixtral"), scheme="W4A16", gptq=True, num_samples=4, seq_len=32,
                      min_expert_tokens=10**6, verify=False, progress=False, dtype="float32")
    experts = [r for r in result.report.layers if ".experts." in r.name]
    assert len(experts) == 2 * 4 * 3
    assert all(f"statistics from all {4 * 32} calibration tokens" in r.note for r in experts)
    assert "24 expert layers calibrated on every token" in "\n".join(result.report.summary_lines())
