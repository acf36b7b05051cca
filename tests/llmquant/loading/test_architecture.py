"""Checkpoints transformers cannot build as a causal LM, custom code, and quantized folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmquant.errors import UnsupportedArchitectureError
from llmquant.loading import load_model


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def _error(folder: Path, **kwargs) -> str:
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_model(folder, device="cpu", **kwargs)
    return str(info.value)


def test_unknown_model_type_is_refused(tiny_copy):
    _edit_config(tiny_copy, model_type="not-a-model", architectures=["NotAModelForCausalLM"])
    message = _error(tiny_copy)
    assert "'not-a-model'" in message and "does not know" in message


def test_model_type_that_is_not_a_causal_lm_is_refused(tiny_copy):
    _edit_config(tiny_copy, model_type="t5")
    message = _error(tiny_copy)
    assert "'t5'" in message and "causal language model" in message


def test_missing_model_type_is_refused(tiny_copy):
    _edit_config(tiny_copy, model_type=None)
    assert "no model_type" in _error(tiny_copy)


def test_custom_code_needs_trust_remote_code(tiny_copy):
    _edit_config(tiny_copy, model_type="my-custom-llm",
                 auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                           "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    # The code must never run without the flag: a module that would raise on import proves it.
    (tiny_copy / "modeling_custom.py").write_text("raise SystemExit('custom code executed')\n")
    message = _error(tiny_copy)
    assert "--trust-remote-code" in message and "modeling_custom.CustomForCausalLM" in message


def test_builtin_architecture_with_auto_map_loads_without_remote_code(tiny_copy):
    # Many repositories keep an auto_map after transformers gained the architecture natively.
    _edit_config(tiny_copy, auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (tiny_copy / "modeling_custom.py").write_text("raise SystemExit('custom code executed')\n")
    loaded = load_model(tiny_copy, device="cpu")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "fp8"])
def test_other_quantization_methods_are_refused(tiny_copy, method):
    _edit_config(tiny_copy, quantization_config={"quant_method": method, "bits": 4})
    message = _error(tiny_copy)
    assert repr(method) in message and "compressed-tensors" in message


def test_custom_code_runs_only_with_trust_remote_code(tiny_copy, tmp_path, monkeypatch):
    import sys

    from transformers import dynamic_module_utils

    # transformers copies repository code into its modules cache: keep that out of the user's.
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    _edit_config(tiny_copy, model_type="my-custom-llm",
                 auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                           "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (tiny_copy / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'my-custom-llm'\n")
    (tiny_copy / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")

    assert "--trust-remote-code" in _error(tiny_copy)
    loaded = load_model(tiny_copy, device="cpu", trust_remote_code=True)
    assert type(loaded.model).__name__ == "CustomForCausalLM"
