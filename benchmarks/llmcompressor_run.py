"""Quantize a model with llm-compressor: run by benchmarks/quality.py inside llm-compressor's own
virtual environment (benchmarks/setup_llmcompressor.sh), never imported by llmquant.

    /tmp/lc-venv/bin/python benchmarks/llmcompressor_run.py CONFIG MODEL_DIR CALIBRATION.safetensors OUTPUT

CONFIG is one of CONFIGS below. The calibration windows come from llmquant's calibration split as
token ids, so both tools see exactly the same text. Prints one JSON line: wall time of the
quantization (load to saved folder) and this process's peak resident memory.
"""

from __future__ import annotations

import json
import resource
import sys
import time

GROUP64 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
GROUP64_ASYM = {**GROUP64, "symmetric": False}


def recipe(config: str):
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    def groups(weights):
        return {"group_0": {"targets": ["Linear"], "weights": weights}}

    return {
        "W4A16 g64 sym RTN": [QuantizationModifier(config_groups=groups(GROUP64), ignore=["lm_head"])],
        "W4A16 g64 sym GPTQ": [GPTQModifier(config_groups=groups(GROUP64), ignore=["lm_head"])],
        "W4A16 g64 asym GPTQ": [GPTQModifier(config_groups=groups(GROUP64_ASYM), ignore=["lm_head"])],
        "W8A8 SmoothQuant + GPTQ": [SmoothQuantModifier(smoothing_strength=0.8),
                                    GPTQModifier(scheme="W8A8", targets=["Linear"], ignore=["lm_head"])],
        "FP8_DYNAMIC": [QuantizationModifier(scheme="FP8_DYNAMIC", targets=["Linear"], ignore=["lm_head"])],
        # Pruning (benchmarks/sparsity.py): the output layer left dense, as ours leaves it.
        "SparseGPT 50%": [SparseGPTModifier(sparsity=0.5, ignore=["re:.*lm_head"])],
        "SparseGPT 2:4": [SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=["re:.*lm_head"])],
        "Wanda 50%": [WandaPruningModifier(sparsity=0.5, ignore=["re:.*lm_head"])],
        "Wanda 2:4": [WandaPruningModifier(sparsity=0.5, mask_structure="2:4", ignore=["re:.*lm_head"])],
    }[config]


def main() -> int:
    config, model_dir, calibration, output = sys.argv[1:5]
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(calibration)["input_ids"]  # (samples, seq_len)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, dataset=data, recipe=recipe(config), max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0])
    model.save_pretrained(output, save_compressed=True)
    tokenizer.save_pretrained(output)
    seconds = time.perf_counter() - t
    import llmcompressor

    print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "llmcompressor": llmcompressor.__version__, "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
