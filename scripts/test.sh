#!/usr/bin/env bash
# Run the test suite: sets up ./.venv first when needed (no demo job), then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not demo"` for the fast subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --install-only
exec "${LLMQUANT_VENV:-.venv}/bin/python" -m pytest "$@"
