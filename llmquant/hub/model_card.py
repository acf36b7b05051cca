"""The model card (README.md) published with a model: Hub metadata, what was done, the measured
results, and how to run it.

    card = build_model_card("out/", "me/SmolLM2-135M-Instruct-W4A16")

The YAML metadata block is what the Hub indexes: `base_model` + `base_model_relation` put the
repository in the base model's tree, `tags` make the scheme searchable, `library_name` and
`pipeline_tag` choose the "Use this model" snippets.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from llmquant.hub.card_facts import CardFacts, EvalTable, gather_facts

LIBRARY_NAME = "transformers"
PIPELINE_TAG = "text-generation"
# Schemes whose folders transformers cannot build yet (see README, compatibility notes).
NOT_FOR_TRANSFORMERS = {"W4A16_ASYM": "compressed-tensors expects an unpacked zero point when transformers "
                                      "builds the model; vLLM and llmquant load it"}


def build_model_card(folder: str | Path, repo_id: str, *, base_model: str | None = None,
                     relation: str | None = None, license: str | None = None) -> tuple[str, CardFacts]:
    """The card's Markdown text for `folder` published as `repo_id`, and the facts it was built from."""
    facts = gather_facts(Path(folder), repo_id, base_model=base_model, relation=relation, license=license)
    return render_card(facts), facts


def card_metadata(facts: CardFacts) -> dict:
    meta: dict = {}
    if facts.base_model:
        meta["base_model"] = facts.base_model
        if facts.relation:
            meta["base_model_relation"] = facts.relation
    if facts.license:
        meta["license"] = facts.license
    meta["library_name"] = LIBRARY_NAME
    meta["pipeline_tag"] = PIPELINE_TAG
    meta["tags"] = facts.tags
    return meta


def render_card(facts: CardFacts) -> str:
    meta = yaml.safe_dump(card_metadata(facts), sort_keys=False, allow_unicode=True)
    parts = [f"---\n{meta}---\n", f"# {facts.repo_id.split('/')[-1]}\n", _summary(facts)]
    parts.append(_what_was_done(facts))
    parts.append(_evaluation(facts))
    parts.append(_usage(facts))
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def _summary(facts: CardFacts) -> str:
    base = f"[{facts.base_model}](https://huggingface.co/{facts.base_model})" if facts.base_model \
        else "its source model"
    version = facts.versions.get("llmquant")
    tool = f"[llmquant](https://pypi.org/project/llmquant/){f' {version}' if version else ''}"
    if facts.relation == "quantized":
        scheme = f"**{facts.scheme}** " if facts.scheme else ""
        text = (f"A {scheme}quantization of {base}, made with {tool}. The weights are stored in the "
                "compressed-tensors format, which vLLM and transformers load as they are.")
    elif facts.relation == "distillation":
        text = f"A model distilled from {base}, made with {tool}."
    else:
        text = f"A model published with {tool}."
    return text + "\n"


def _what_was_done(facts: CardFacts) -> str:
    lines = ["## What was done", ""]
    if facts.source_description:
        lines.append(f"- Source: {facts.source_description}" if facts.source_kind == "demo"
                     else f"- Source: `{facts.source_description}`")
    if facts.scheme:
        lines.append(f"- Scheme: `{facts.scheme}`" + (f" (compressed-tensors format `{facts.quant_format}`)"
                                                       if facts.quant_format else ""))
    if facts.calibration:
        lines.append(f"- Calibration data: {_calibration(facts.calibration)}")
    elif facts.relation == "quantized":
        lines.append("- Calibration data: none (a weight-only scheme needs no activation statistics)")
    if facts.self_distill:
        lines.append("- " + facts.self_distill[0].upper() + facts.self_distill[1:])
    if facts.sparsity:
        lines.append("- " + facts.sparsity[0].upper() + facts.sparsity[1:])
    if facts.verification:
        v = facts.verification
        try:
            lines.append(f"- Verification, the saved checkpoint reloaded against the original model on "
                         f"{int(v['tokens']):,} held-out tokens: mean KL divergence {float(v['kl_mean']):.5f} "
                         f"nats/token, top-1 token agreement {100 * float(v['top1_agreement']):.2f}%")
        except (KeyError, TypeError, ValueError):
            pass
    if facts.checkpoint_bytes:
        lines.append(f"- Checkpoint size: {facts.checkpoint_bytes / 1e6:,.1f} MB")
    if facts.versions:
        lines.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in facts.versions.items()))
    if len(lines) == 2 and not facts.recipe_yaml:
        return ""
    if facts.recipe_yaml:
        lines += ["", "The recipe (`recipe.yaml` in this repository):", "", "```yaml",
                  facts.recipe_yaml.rstrip(), "```"]
        # The demo model is quantized by naming no model (its weights are not the Hub's bf16 ones).
        model = "" if facts.source_kind == "demo" else f" {facts.base_model}" if facts.base_model else None
        if model is not None:
            lines += ["", "To reproduce:", "", "```bash",
                      f"llmquant quantize{model} --recipe recipe.yaml --output out/", "```"]
    return "\n".join(lines) + "\n"


def _calibration(cal: dict) -> str:
    if cal.get("description"):
        return str(cal["description"])
    return ", ".join(f"{k} {v}" for k, v in cal.items())


def _evaluation(facts: CardFacts) -> str:
    if not facts.tables:
        return ""
    lines = ["## Evaluation", ""]
    for table in facts.tables:
        lines += _table(table)
    return "\n".join(lines)


def _table(table: EvalTable) -> list[str]:
    out = [f"### {table.title}", "", f"From `{table.source}` in this repository.", "",
           "| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
    out += ["| " + " | ".join(row) + " |" for row in table.rows]
    return out + [""]


def _usage(facts: CardFacts) -> str:
    repo = facts.repo_id
    chat = facts.has_chat_template
    lines = ["## Usage", "", "### vLLM", "", "```bash", f"vllm serve {repo}", "```", "", "```python",
             "from vllm import LLM, SamplingParams", "", f'llm = LLM("{repo}")']
    if chat:
        lines.append('print(llm.chat([{"role": "user", "content": "Hello!"}], SamplingParams(max_tokens=64)))')
    else:
        lines.append('print(llm.generate("Hello,", SamplingParams(max_tokens=64)))')
    lines += ["```", "", "### transformers", ""]
    blocked = NOT_FOR_TRANSFORMERS.get(facts.scheme or "")
    if blocked:
        lines += [f"Not yet: {blocked}.", ""]
    else:
        if facts.quant_format:
            lines += ["Needs the `compressed-tensors` package (`pip install compressed-tensors`).", ""]
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
                  f'model = AutoModelForCausalLM.from_pretrained("{repo}")']
        if chat:
            lines += ['messages = [{"role": "user", "content": "Hello!"}]',
                      "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
                      "return_tensors=\"pt\", return_dict=True)"]
        else:
            lines.append('inputs = tokenizer("Hello,", return_tensors="pt")')
        lines += ["output = model.generate(**inputs, max_new_tokens=64)",
                  "print(tokenizer.decode(output[0], skip_special_tokens=True))", "```", ""]
    lines += ["### llmquant", "", "An OpenAI-compatible server on http://127.0.0.1:8000/v1 that runs the "
              "quantized layers itself, on CPU or CUDA:" if facts.quant_format else
              "An OpenAI-compatible server on http://127.0.0.1:8000/v1, on CPU or CUDA:",
              "", "```bash", "pip install llmquant", f"llmquant serve {repo}", "```"]
    return "\n".join(lines) + "\n"
