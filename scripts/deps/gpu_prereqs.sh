#!/usr/bin/env bash
# Make MODULE... importable by PYTHON, installing the missing ones offline from the wheel folder WHEELS into
# SITE (a folder of its own: the machine's Python environment is left as it is). Prints the PYTHONPATH entry to
# add (SITE, or nothing when every module was already there). Used by scripts/check_gpu.sh on the GPU machine.
#
#   scripts/deps/gpu_prereqs.sh PYTHON WHEELS SITE MODULE...
#
# Exit 1, saying which modules are missing and how to bring them, when they cannot be installed.
set -uo pipefail
PY="$1" WHEELS="$2" SITE="$3"; shift 3

missing() {  # the modules of "$@" that PY cannot import (with SITE on its path)
    local module
    for module in "$@"; do
        PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import $module" >/dev/null 2>&1 || printf '%s\n' "$module"
    done
}

MISSING=($(missing "$@"))
if ((${#MISSING[@]} == 0)); then
    [[ -d "$SITE" ]] && echo "$SITE"
    exit 0
fi
if [[ ! -d "$WHEELS" ]]; then
    echo "error: $PY cannot import ${MISSING[*]} and there is no wheel folder $WHEELS: run scripts/deps/gpu_wheels.sh" \
        "where pip reaches PyPI and carry .gpu-wheels with the tree, or pip install them" >&2
    exit 1
fi
echo "installing ${MISSING[*]} from $WHEELS (offline) into $SITE" >&2
if ! "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" --target "$SITE" "${MISSING[@]}" >&2; then
    echo "error: pip could not install ${MISSING[*]} from $WHEELS (wheels for another Python or platform?)" >&2
    exit 1
fi
STILL=($(missing "${MISSING[@]}"))
if ((${#STILL[@]})); then
    echo "error: installed but still cannot import ${STILL[*]} from $SITE" >&2
    exit 1
fi
echo "$SITE"
