#!/usr/bin/env bash
# Re-pin constraints.txt: resolve every extra of pyproject.toml (train, eval, test, bench, demo) to the newest
# releases its ranges admit, in a new virtual environment, and write the exact versions.
#
#   scripts/deps/lock.sh            # then run the test suite with the new pins before committing them
#
# Environment (optional):
#   PYTHON   the interpreter for the new environment (default python3)
#   VENV     reuse this environment instead of building a new one (its packages are frozen as they are)
# The lock is for Linux with Python >= 3.11 (numpy 2.3+); flash-attn (the gpu extra) needs CUDA and is not pinned.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
EXTRAS="train,eval,test,bench,demo,serve"

if [[ -z "${VENV:-}" ]]; then
    VENV="$(mktemp -d)/venv"
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet -e ".[${EXTRAS}]"
fi
PY_VERSION="$("$VENV/bin/python" -c 'import platform; print(platform.python_version())')"
TORCH="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
{
    echo "# Pinned environment of the slowfast-llava extras ${EXTRAS}, the versions the test suite passed with."
    echo "# Written by scripts/deps/lock.sh on $(date -u +%Y-%m-%d) (Linux $(uname -m), Python ${PY_VERSION}, torch ${TORCH})."
    echo "# Use it as pip constraints:  pip install -c constraints.txt -e \".[train,eval,test]\""
    echo "# Drift against the newest releases: scripts/deps/check_latest.sh"
    # pip freeze --all keeps setuptools (a runtime dependency of torch); the project itself and pip are left out.
    "$VENV/bin/pip" freeze --all --exclude-editable | grep -viE '^(pip|slowfast-llava)==' | LC_ALL=C sort -f
} > constraints.txt
echo "wrote constraints.txt: $(grep -vc '^#' constraints.txt) packages pinned (Python ${PY_VERSION}, torch ${TORCH})"
