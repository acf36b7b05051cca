# Sourced by the benchmarks' setup scripts (after they cd to the repository root and set PY).
# pip, without the warnings about configured indexes that do not exist here; its own exit status.
pip_quiet() {
    local log rc=0
    log=$("$PY" -m pip "$@" 2>&1) || rc=$?
    printf '%s\n' "$log" | grep -v -e "^WARNING: Location" -e "^WARNING: Retrying" -e "^$" || true
    return "$rc"
}
