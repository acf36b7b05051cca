#!/usr/bin/env bash
# llm-compressor in its own virtual environment, for benchmarks/quality.py --llmcompressor.
# It is a baseline to compare against, not a dependency of llmquant.
#
#   bash benchmarks/setup_llmcompressor.sh [VENV]      # default /tmp/lc-venv
#
# torch is installed first, pinned to the CPU build the project uses: with no torch present,
# llmcompressor's plain `torch` requirement would pull a multi-GB CUDA build. A dry run checks
# that the install keeps that torch before anything is changed.
set -euo pipefail
VENV="${1:-/tmp/lc-venv}"
TORCH="${TORCH_SPEC:-torch==2.13.0}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "$TORCH"
plan="$("$VENV/bin/pip" install --dry-run llmcompressor 2>&1)"
if grep -i 'Would install' <<<"$plan" | tr ' ' '\n' | grep -Eiq '^(torch-[0-9]|triton-[0-9]|nvidia-[a-z0-9-]*cu)'; then
    echo "refusing: installing llmcompressor would replace the CPU torch build:" >&2
    grep -i 'Would install' <<<"$plan" >&2
    exit 1
fi
"$VENV/bin/pip" install --quiet llmcompressor
"$VENV/bin/python" -c "import llmcompressor, torch; print('llmcompressor', llmcompressor.__version__, 'torch', torch.__version__)"
