"""The support matrix: every architecture of tests/architectures.py, quantized completely, saved in
its checkpoint's own layout, loaded back by llmquant and by transformers + compressed-tensors, and
served. Tiny random models (2-3 layers, hidden 64); each test is one column of the README's support
matrix (`scripts/support_matrix.py` runs this module and writes the table from its results).
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open


def _helper(name: str):
    """tests/NAME.py, loaded by path once (the test folders are not packages), as conftest does."""
    import importlib.util
    import sys

    key = f"llmquant_tests_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).parents[1] / f"{name}.py")
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


ARCH = _helper("architectures")
MATRIX = list(ARCH.ARCHITECTURES)
MOE = set(ARCH.MOE_TYPES)
CAL = dict(num_samples=8, seq_len=64, seed=0)
# Tensor name suffixes of the compressed-tensors format, all standing for one `weight`.
_QUANTIZED_SUFFIX = re.compile(r"\.(weight_packed|weight_scale|weight_shape|weight_zero_point|input_scale)$")
_ROUTER = re.compile(r"\.(mlp|block_sparse_moe)\.(gate|router|shared_expert_gate)\.weight$")
# transformers has no per-expert loader for gpt-oss (its bf16 checkpoints hold experts fused);
# llm-compressor's and vLLM's per-expert layout is what quantized gpt-oss folders carry.
NO_TRANSFORMERS_RELOAD = {"gpt_oss": "transformers cannot load per-expert (quantized) gpt-oss experts"}

_runs: dict[tuple[str, str], tuple] = {}


def _quantize(arch: str, algorithm: str, architecture_dir, tmp_path_factory):
    """One quantization per (architecture, algorithm), shared by the tests that read it."""
    from llmquant import quantize

    key = (arch, algorithm)
    if key not in _runs:
        options = {"rtn": dict(scheme="W4A16"), "gptq": dict(scheme="W4A16", gptq=True, min_expert_tokens=8),
                   "smoothquant": dict(scheme="W8A8"), "awq": dict(scheme="W4A16", awq=True)}[algorithm]
        out = tmp_path_factory.mktemp(f"{arch}-{algorithm}") / "q"
        result = quantize(architecture_dir(arch), output=out, verify=False, progress=False, dtype="float32",
                          **CAL, **options)
        _runs[key] = (architecture_dir(arch), out, result)
    return _runs[key]


def _tensor_shapes(folder: Path) -> dict[str, list[int]]:
    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    return shapes


def _weight_name(name: str) -> str:
    return _QUANTIZED_SUFFIX.sub(".weight", name)


def _expected_names(arch: str, source: Path) -> set[str]:
    """The source checkpoint's tensor names; gpt-oss's fused experts expand to per-expert Linear layers."""
    names = set(_tensor_shapes(source))
    if arch != "gpt_oss":
        return names
    out = {n for n in names if ".mlp.experts." not in n}
    for n in names:
        if n.endswith(".mlp.experts.down_proj"):
            prefix = n[: -len("down_proj")]
            experts = _tensor_shapes(source)[n][0]
            out |= {f"{prefix}{e}.{p}.{t}" for e in range(experts) for p in ("gate_proj", "up_proj", "down_proj")
                    for t in ("weight", "bias")}
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float().flatten()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def _ids(vocab: int = 500) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", MATRIX)
def test_rtn(arch, architecture_dir, tmp_path_factory):
    """Plain rounding covers every decoder weight matrix (experts included, each with its own
    scales), writes the source checkpoint's names and config, and llmquant reloads it quantized."""
    from llmquant import load_model
    from llmquant.arch.experts import LinearExperts
    from llmquant.quant.linear import QuantizedLinear

    source, out, result = _quantize(arch, "rtn", architecture_dir, tmp_path_factory)
    shapes = _tensor_shapes(source)
    # Every matrix but the embeddings, the output layer and the routers, counted on the source files
    # (gpt-oss stacks its expert biases into 2-D tensors: biases, not matrices).
    expected = sum(torch.Size(s).numel() for n, s in shapes.items()
                   if len(s) >= 2 and "embed_tokens" not in n and not n.startswith("lm_head")
                   and not _ROUTER.search(n) and not n.endswith("_bias"))
    coverage = result.report.coverage
    assert sum(coverage.quantized_params.values()) == expected
    assert {g.reason.split(",")[0] for g in coverage.kept} <= {"embedding", "ignore 'lm_head'", "router"}
    saved = _tensor_shapes(out)
    assert {_weight_name(n) for n in saved} == _expected_names(arch, source)
    # config.json is the source's, plus quantization_config.
    config = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == json.loads(
        (source / "config.json").read_text())
    # The ignore list names modules as the checkpoint does (their float weights are in the files).
    assert all(f"{n}.weight" in saved for n in config["quantization_config"]["ignore"])

    loaded = load_model(out, dtype="float32")
    quantized = [m for m in loaded.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == len(result.report.layers)
    if arch in MOE:
        experts = [m for m in loaded.model.modules() if isinstance(m, LinearExperts)]
        assert experts and all(isinstance(e[i].get_submodule(p), QuantizedLinear)
                               for e in experts for i in range(len(e)) for p in e[i].projection_names)
    ids = _ids()
    assert _cosine(_logits(loaded.model, ids), _logits(result.model, ids)) > 0.99999


@pytest.mark.parametrize("arch", MATRIX)
def test_transformers_reload(arch, architecture_dir, tmp_path_factory):
    """transformers + compressed-tensors loads the folder and computes what llmquant's runtime does."""
    if arch in NO_TRANSFORMERS_RELOAD:
        pytest.xfail(NO_TRANSFORMERS_RELOAD[arch])
    from transformers import AutoModelForCausalLM

    from llmquant import load_model

    _, out, _ = _quantize(arch, "rtn", architecture_dir, tmp_path_factory)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_model(out, dtype="float32").model
    ids = _ids()
    assert _cosine(_logits(theirs, ids), _logits(ours, ids)) >= 0.999


@pytest.mark.parametrize("arch", MATRIX)
def test_gptq(arch, architecture_dir, tmp_path_factory):
    """GPTQ quantizes every targeted layer; an expert's Hessian comes from the tokens routed to it:
    in each MoE layer the experts' routed counts add up to tokens x experts per token."""
    _, _, result = _quantize(arch, "gptq", architecture_dir, tmp_path_factory)
    layers = result.report.layers
    assert layers and all(r.scheme.endswith("(GPTQ)") for r in layers)
    assert all(r.output_sqnr_db is not None and r.output_sqnr_db > 5 for r in layers)
    if arch not in MOE:
        return
    top_k = result.model.config.num_experts_per_tok
    gates: dict[str, int] = {}
    for r in layers:
        m = re.match(r"(.*\.experts)\.\d+\.(gate_proj|w1)$", r.name)
        if m:
            gates[m.group(1)] = gates.get(m.group(1), 0) + r.calibration_tokens
    assert gates and set(gates.values()) == {CAL["num_samples"] * CAL["seq_len"] * top_k}


@pytest.mark.parametrize("arch", MATRIX)
def test_smoothquant(arch, architecture_dir, tmp_path_factory):
    """W8A8 with SmoothQuant: every folding the registry and the reader check allow is applied; the
    skipped ones are the (1 + w) norms of Gemma, and the output stays close to the original."""
    source, _, result = _quantize(arch, "smoothquant", architecture_dir, tmp_path_factory)
    smoothing = result.report.smoothquant
    assert smoothing["applied"] > 0
    assert all("does not scale with its weight" in why and "gemma" in arch for why in smoothing["skipped"].values())
    _assert_close_to_source(source, result.model, min_cosine=0.99)


@pytest.mark.parametrize("arch", MATRIX)
def test_awq(arch, architecture_dir, tmp_path_factory):
    """AWQ scaling finds its mappings on every architecture, and the scaled model rounds at least
    about as well as plain rounding does (a wrong folding would change the function itself)."""
    source, _, result = _quantize(arch, "awq", architecture_dir, tmp_path_factory)
    smoothing = result.report.smoothquant
    assert smoothing["applied"] > 0
    assert all("does not scale with its weight" in why and "gemma" in arch for why in smoothing["skipped"].values())
    _, _, plain = _quantize(arch, "rtn", architecture_dir, tmp_path_factory)
    original, ids = _original(source), _ids()
    reference = _logits(original, ids)
    assert _cosine(reference, _logits(result.model, ids)) > _cosine(reference, _logits(plain.model, ids)) - 0.01


def _original(source: Path):
    from llmquant import load_model

    return load_model(source, dtype="float32").model


def _assert_close_to_source(source: Path, quantized, min_cosine: float) -> None:
    ids = _ids()
    assert _cosine(_logits(_original(source), ids), _logits(quantized, ids)) > min_cosine


@pytest.mark.parametrize("arch", MATRIX)
def test_serve(arch, architecture_dir, tmp_path_factory):
    """A real HTTP server over the quantized folder answers the official openai client's chat
    completion with the tokens the engine itself generates for that conversation."""
    import uvicorn
    from openai import OpenAI

    from llmquant import load_model
    from llmquant.serve.app import create_app
    from llmquant.serve.engine import Engine
    from llmquant.serve.sampling import SamplingParams

    _, out, _ = _quantize(arch, "rtn", architecture_dir, tmp_path_factory)
    loaded = load_model(out, dtype="float32")
    engine = Engine(loaded, max_batch_size=4)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, arch), host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "What does a compiler do?"}]
        reply = client.chat.completions.create(model=arch, messages=messages, max_tokens=8, temperature=0)
        prompt = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
        direct = [e.token_id for e in engine.generate(list(prompt), SamplingParams(temperature=0, max_tokens=8))
                  if e.token_id is not None]
    finally:
        server.should_exit = True
        thread.join(10)
        engine.shutdown(drain=False, timeout=10)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(direct) >= 1
    assert reply.choices[0].message.content == loaded.tokenizer.decode(direct, skip_special_tokens=True)
