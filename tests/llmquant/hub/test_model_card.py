"""The generated model card: Hub metadata the Hub client parses, the recipe that reproduces the
run, the measured numbers exactly as the folder's files hold them, and defensive reading."""

from __future__ import annotations

import json
import shutil

import yaml
from huggingface_hub import ModelCard

from llmquant.hub import build_model_card
from llmquant.config.recipe import Recipe


def _report(folder, **source) -> None:
    """Rewrite the folder's quantization_report.json source, as a run from that source writes it."""
    path = folder / "quantization_report.json"
    report = json.loads(path.read_text())
    report["source"] = {**report["source"], **source}
    path.write_text(json.dumps(report))


def test_card_metadata_and_body_from_a_quantized_folder(folder):
    _report(folder, kind="demo", name="demo:SmolLM2-135M-Instruct")
    text, facts = build_model_card(folder, "me/smol-W8A8")

    card = ModelCard(text)  # the Hub client's own parser of the YAML block
    meta = card.data.to_dict()
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "quantized" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"w8a8", "compressed-tensors", "llmquant"} <= set(meta["tags"])

    # The recipe block is recipe.yaml verbatim, and it loads back as the same recipe.
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert block == (folder / "recipe.yaml").read_text()
    assert Recipe.from_yaml(block) == Recipe.load(folder / "recipe.yaml")
    # The demo model's weights came through a GGUF file: reproducing means naming no model.
    assert "llmquant quantize --recipe recipe.yaml --output out/" in text
    assert "converted from the Q4_1 GGUF" in text

    report = json.loads((folder / "quantization_report.json").read_text())
    assert f"- Calibration data: {report['calibration']['description']}" in text
    v = report["verification"]
    assert f"mean KL divergence {v['kl_mean']:.5f}" in text and f"{100 * v['top1_agreement']:.2f}%" in text
    assert f"llmquant {report['environment']['llmquant']}" in text

    ppl = json.loads((folder / "perplexity_quantized.json").read_text())
    row = f"| quantized | {ppl['perplexity']:.3f} | {ppl['bits_per_byte']:.4f} | {ppl['num_tokens_scored']:,} |"
    assert row in text
    for snippet in ("vllm serve me/smol-W8A8", 'AutoModelForCausalLM.from_pretrained("me/smol-W8A8")',
                    "llmquant serve me/smol-W8A8", "pip install compressed-tensors"):
        assert snippet in text
    assert facts.notes == []


def test_hub_source_license_from_the_cached_card(folder, tmp_path, monkeypatch):
    """A Hub source's license is read from its card in the local cache (no network)."""
    from huggingface_hub import constants

    commit = "a" * 40
    snapshot = tmp_path / "hub" / "models--org--base" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: llama3.2\n---\n# base\n")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _report(folder, kind="hub", name="org/base", revision=commit)
    text = build_model_card(folder, "me/base-W8A8")[0]
    meta = ModelCard(text).data.to_dict()
    assert meta["base_model"] == "org/base" and meta["license"] == "llama3.2"
    assert "llmquant quantize org/base --recipe recipe.yaml --output out/" in text


def test_explicit_arguments_win_and_distillation(folder):
    text, _ = build_model_card(folder, "me/student", base_model="org/teacher", relation="distillation",
                               license="mit")
    meta = ModelCard(text).data.to_dict()
    assert (meta["base_model"], meta["base_model_relation"], meta["license"]) == ("org/teacher", "distillation", "mit")
    assert "distillation" in meta["tags"] and "distilled from [org/teacher]" in text


def test_unknown_source_gives_notes_not_guesses(folder):
    _report(folder, kind="local", description=str(folder.parent / "nowhere"))
    text, facts = build_model_card(folder, "me/x")
    meta = ModelCard(text).data.to_dict()
    assert "base_model" not in meta and "license" not in meta
    assert facts.base_model is None and facts.license is None


def test_suite_and_throughput_results_are_read_defensively(folder):
    (folder / "results.json").write_text(json.dumps({"results": [
        {"model": "me/x", "task": "perplexity", "perplexity": 9.66, "checkpoint_mb": 164.2},
        {"model": "me/x", "task": "throughput", "decode_tok_s": 56.7}]}))
    (folder / "throughput_cpu.json").write_text(json.dumps({"decode": {"batch_1": 19.2, "batch_8": 48.25},
                                                            "device": "cpu"}))
    (folder / "perplexity_original.json").write_text("{not json")
    text, facts = build_model_card(folder, "me/x")
    assert "| model | task | perplexity | checkpoint_mb | decode_tok_s |" in text
    assert "| me/x | perplexity | 9.66 | 164.2 |  |" in text and "| me/x | throughput |  |  | 56.7 |" in text
    assert "| decode.batch_1 | 19.2 |" in text and "| decode.batch_8 | 48.25 |" in text
    assert facts.notes == ["perplexity_original.json could not be read (JSONDecodeError); skipped"]

    (folder / "results.json").write_text(json.dumps(["just", "strings"]))
    text, facts = build_model_card(folder, "me/x")
    assert "Evaluation suite results" not in text
    assert "results.json holds no numbers llmquant can show; skipped" in facts.notes


def test_a_plain_folder_without_llmquant_files(tmp_path, tiny_model_dir):
    plain = shutil.copytree(tiny_model_dir, tmp_path / "plain")
    text, facts = build_model_card(plain, "me/plain", base_model="org/base", relation="distillation")
    meta = ModelCard(text).data.to_dict()
    assert "compressed-tensors" not in meta["tags"] and "- Scheme:" not in text and "```yaml" not in text
    assert "pip install compressed-tensors" not in text and "vllm serve me/plain" in text


def test_asymmetric_int4_card_does_not_offer_transformers(folder):
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe["quantize"]["scheme"] = "W4A16_ASYM"
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    text, _ = build_model_card(folder, "me/asym")
    transformers_section = text.split("### transformers", 1)[1].split("###", 1)[0]
    assert "Not yet" in transformers_section and "from_pretrained" not in transformers_section


def test_perplexity_change_against_the_original(folder):
    quantized = json.loads((folder / "perplexity_quantized.json").read_text())
    original = {**quantized, "perplexity": quantized["perplexity"] / 1.25}
    (folder / "perplexity_original.json").write_text(json.dumps(original))
    text, _ = build_model_card(folder, "me/x")
    assert f"| original | {original['perplexity']:.3f} |  |" in text
    assert f"| quantized | {quantized['perplexity']:.3f} | +25.00% |" in text
