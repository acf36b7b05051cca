#!/usr/bin/env bash
# llama.cpp (llama-cpp-python) in its own virtual environment, for benchmarks/speed.py, with its
# OpenAI server's dependencies, for benchmarks/serving.py, and llama.cpp's own quantizer tools, for
# benchmarks/gguf_quality.py. A baseline to compare against,
# not a dependency of llmquant. Built from source: 6-12 minutes on 2 cores for llama-cpp-python,
# about as long again for the tools. Succeeds only once a short generation has run and the tools
# and the converter start.
#
#   bash benchmarks/setup_llamacpp.sh [VENV]      # default /tmp/llamacpp-venv
#
# What it makes:
#   $VENV                      llama-cpp-python (speed.py, gguf_quality.py run their llama.cpp side in it)
#                              and its server's packages (serving.py runs python -m llama_cpp.server)
#   $VENV/bin/llama-quantize, $VENV/bin/llama-imatrix
#                              built from the llama.cpp that the same llama-cpp-python sdist vendors
#                              (same version, same CPU flags), statically linked
#   $VENV/llama.cpp/           that llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/, plus
#                              convert-deps/ (sentencepiece, which the converter imports for Llama
#                              models even when the tokenizer is a tokenizer.json). The converter runs
#                              with a python that has torch and transformers (./.venv):
#       PYTHONPATH=$VENV/llama.cpp/gguf-py:$VENV/llama.cpp/convert-deps \
#           .venv/bin/python $VENV/llama.cpp/convert_hf_to_gguf.py MODEL_DIR --outtype f32 --outfile X.gguf
#
# Environment: LLAMA_CPP_PYTHON (pip spec, default llama-cpp-python==0.3.36), CMAKE_ARGS (replaces
# the flags chosen below), LLAMACPP_GGUF (the model for the check; default: the demo model's Q4_1
# GGUF, found through llmquant in ./.venv), LLAMACPP_REBUILD=1 (rebuild even if installed),
# LLAMACPP_TOOLS=0 (skip the quantizer tools).
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

source benchmarks/pip_quiet.sh  # pip_quiet: pip without the missing-index warnings

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

# The OpenAI-compatible server (python -m llama_cpp.server, for benchmarks/serving.py): the packages of
# llama-cpp-python's [server] extra, named here so that pip does not rebuild llama-cpp-python for them.
if "$PY" -c "import llama_cpp.server.app" 2>/dev/null; then
    echo "llama_cpp.server's dependencies already installed"
else
    pip_quiet install --quiet "uvicorn>=0.22.0" "fastapi>=0.100.0" "pydantic-settings>=2.0.1" \
        "sse-starlette>=1.6.1" "starlette-context>=0.3.6,<0.4" "PyYAML>=5.1"
    "$PY" -c "import llama_cpp.server.app" \
        || { echo "error: llama_cpp.server does not import after installing its dependencies" >&2; exit 1; }
fi

# ---- llama.cpp's quantizer tools and converter, from the same sdist ------------------------------
TOOLS="$VENV/llama.cpp"
STAMP="$TOOLS/BUILD_INFO"
wanted_stamp="$VERSION $CMAKE_ARGS"
if [ "${LLAMACPP_TOOLS:-1}" = 1 ]; then
    if [ "${LLAMACPP_REBUILD:-0}" != 1 ] && [ -x "$VENV/bin/llama-quantize" ] && [ -x "$VENV/bin/llama-imatrix" ] && \
       [ -f "$TOOLS/convert_hf_to_gguf.py" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$wanted_stamp" ]; then
        echo "llama-quantize, llama-imatrix and the converter already in $VENV (LLAMACPP_REBUILD=1 to rebuild)"
    else
        for tool in cmake ninja; do
            command -v "$tool" >/dev/null || pip_quiet install --quiet "$tool"  # the venv's bin is put on PATH below
        done
        src=$(mktemp -d /tmp/llamacpp-src.XXXXXX)
        trap 'rm -rf "$src"' EXIT
        echo "building llama-quantize and llama-imatrix from the $VERSION sdist with CMAKE_ARGS: $CMAKE_ARGS"
        pip_quiet download --quiet --no-deps --no-binary :all: --no-cache-dir -d "$src" "$VERSION"
        tar -xzf "$src"/*.tar.gz -C "$src"
        lcpp=$(echo "$src"/*/vendor/llama.cpp)
        [ -f "$lcpp/CMakeLists.txt" ] || { echo "error: no vendored llama.cpp in the sdist ($lcpp)" >&2; exit 1; }
        # shellcheck disable=SC2086  # CMAKE_ARGS is a list of flags
        PATH="$VENV/bin:$PATH" cmake -S "$lcpp" -B "$lcpp/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
            -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_SERVER=OFF $CMAKE_ARGS > "$src/cmake.log" 2>&1 \
            || { tail -30 "$src/cmake.log" >&2; exit 1; }
        PATH="$VENV/bin:$PATH" cmake --build "$lcpp/build" --target llama-quantize llama-imatrix \
            -j "$(nproc)" > "$src/build.log" 2>&1 || { tail -30 "$src/build.log" >&2; exit 1; }
        install -m 755 "$lcpp/build/bin/llama-quantize" "$lcpp/build/bin/llama-imatrix" "$VENV/bin/"
        rm -rf "$TOOLS"
        mkdir -p "$TOOLS"
        cp -r "$lcpp/convert_hf_to_gguf.py" "$lcpp/conversion" "$lcpp/gguf-py" "$TOOLS/"
        # The converter's sentencepiece, apart from the venv that runs it (./.venv stays as it is).
        pip_quiet install --quiet --target "$TOOLS/convert-deps" "sentencepiece>=0.1.98,<0.3.0"
        echo "$wanted_stamp" > "$STAMP"
        rm -rf "$src"
        trap - EXIT
    fi
    for tool in llama-quantize llama-imatrix; do  # llama-quantize --help exits 1: look for its usage line
        help_text=$("$VENV/bin/$tool" --help 2>&1 || true)
        [[ "$help_text" == *usage* ]] \
            || { echo "error: $VENV/bin/$tool does not start: ${help_text:0:500}" >&2; exit 1; }
    done
    if [ -x .venv/bin/python ]; then
        PYTHONPATH="$TOOLS/gguf-py:$TOOLS/convert-deps" NO_LOCAL_GGUF=1 \
            .venv/bin/python "$TOOLS/convert_hf_to_gguf.py" --help > /dev/null \
            || { echo "error: llama.cpp's converter does not start with .venv/bin/python" >&2; exit 1; }
    fi
    echo "llama.cpp tools ready: $VENV/bin/llama-quantize, $VENV/bin/llama-imatrix, $TOOLS/convert_hf_to_gguf.py"
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
echo "llama.cpp ready: $PY (benchmarks/speed.py / gguf_quality.py / serving.py --llamacpp-python $PY)"
