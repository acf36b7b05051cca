#!/usr/bin/env bash
# llama.cpp (llama-cpp-python) in its own virtual environment, for benchmarks/speed.py.
# It is a baseline to compare against, not a dependency of llmquant. Built from source:
# 6-12 minutes on 2 cores. Succeeds only once a short generation has run.
#
#   bash benchmarks/setup_llamacpp.sh [VENV]      # default /tmp/llamacpp-venv
#
# Environment: LLAMA_CPP_PYTHON (pip spec, default llama-cpp-python==0.3.36), CMAKE_ARGS (replaces
# the flags chosen below), LLAMACPP_GGUF (the model for the check; default: the demo model's Q4_1
# GGUF, found through llmquant in ./.venv), LLAMACPP_REBUILD=1 (rebuild even if installed).
#
# Why not GGML_NATIVE=ON: on CPUs that report AMX, a native build of llama-cpp-python 0.3.36 loads
# models but dies with SIGILL at the first evaluation. So the build is portable (GGML_NATIVE=OFF)
# with each x86 instruction set switched on only when this CPU reports it, and AMX always off.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-/tmp/llamacpp-venv}"
VERSION="${LLAMA_CPP_PYTHON:-llama-cpp-python==0.3.36}"
PY="$VENV/bin/python"

cpu_flags=$(grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $cpu_flags " == *" $1 "* ]] && echo ON || echo OFF; }
default_cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma)
 -DGGML_F16C=$(has f16c) -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi)
 -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16)
 -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
CMAKE_ARGS="${CMAKE_ARGS:-$(echo $default_cmake_args)}"

# pip, without the warnings about configured indexes that do not exist here; its own exit status
pip_quiet() {
    local log rc=0
    log=$("$PY" -m pip "$@" 2>&1) || rc=$?
    printf '%s\n' "$log" | grep -v -e "^WARNING: Location" -e "^WARNING: Retrying" -e "^$" || true
    return "$rc"
}

if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
    pip_quiet install --quiet --upgrade pip
fi
wanted_version="${VERSION##*==}"
installed_version=$("$PY" -c "import llama_cpp; print(llama_cpp.__version__)" 2>/dev/null || true)
if [ "${LLAMACPP_REBUILD:-0}" = 1 ] || [ -z "$installed_version" ] || \
   { [ "$wanted_version" != "$VERSION" ] && [ "$installed_version" != "$wanted_version" ]; }; then
    [ -n "$installed_version" ] && pip_quiet uninstall --quiet -y llama-cpp-python
    echo "building $VERSION with CMAKE_ARGS: $CMAKE_ARGS"
    # --no-cache-dir: a wheel cached from another build (other flags, another CPU) is never reused
    CMAKE_ARGS="$CMAKE_ARGS" pip_quiet install --quiet --no-cache-dir --no-binary llama-cpp-python "$VERSION"
else
    echo "llama-cpp-python $installed_version already installed in $VENV (LLAMACPP_REBUILD=1 to rebuild)"
fi

GGUF="${LLAMACPP_GGUF:-}"
if [ -z "$GGUF" ]; then
    if [ ! -x .venv/bin/python ]; then
        echo "error: no model for the check: set LLAMACPP_GGUF=FILE.gguf, or run 'bash scripts/setup.sh --install-only' first" >&2
        exit 1
    fi
    GGUF=$(.venv/bin/python -c "from llmquant.loading.demo import demo_gguf_file; print(demo_gguf_file())")
fi

# The check: load the model and generate a few tokens in a child process, so that a crash (SIGILL,
# SIGSEGV) is reported as a failure of this script rather than passing unnoticed.
echo "checking a short generation with $GGUF"
set +e
"$PY" - "$GGUF" <<'PYEOF'
import sys
import llama_cpp

llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
out = llm("The capital of France is", max_tokens=8, temperature=0.0)
text = out["choices"][0]["text"]
tokens = out["usage"]["completion_tokens"]
if tokens < 1:
    sys.exit(f"llama.cpp generated no tokens: {out!r}")
print(f"llama-cpp-python {llama_cpp.__version__}: generated {tokens} tokens: {text!r}")
PYEOF
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
    if [ "$rc" -gt 128 ]; then
        echo "error: llama.cpp was killed by signal $((rc - 128)) during the check generation" \
             "(4 = SIGILL: the build uses instructions this CPU lacks; set CMAKE_ARGS and LLAMACPP_REBUILD=1)" >&2
    else
        echo "error: the llama.cpp check generation failed (exit code $rc)" >&2
    fi
    exit 1
fi
echo "llama.cpp ready: $PY (benchmarks/speed.py --llamacpp-python $PY)"
