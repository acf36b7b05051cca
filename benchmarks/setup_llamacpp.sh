#!/usr/bin/env bash
# llama.cpp (llama-cpp-python) in its own virtual environment, for benchmarks/speed.py.
# It is a baseline to compare against, not a dependency of llmquant. Built from source for
# this CPU (GGML_NATIVE): 6-12 minutes on 2 cores.
#
#   bash benchmarks/setup_llamacpp.sh [VENV]      # default /tmp/llamacpp-venv
set -euo pipefail
VENV="${1:-/tmp/llamacpp-venv}"
VERSION="${LLAMA_CPP_PYTHON:-llama-cpp-python==0.3.36}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" "$VENV/bin/pip" install --quiet --no-cache-dir "$VERSION"
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
