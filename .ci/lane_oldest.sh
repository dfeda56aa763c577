#!/usr/bin/env bash
# The oldest transformers and PyAV that pyproject.toml admits (their lower bounds), the rest resolved as pip does:
# the bounds must be true, since vLLM's CPU build and the GPU image pin older transformers than the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p logs/ci-oldest-pins
PY=.venv/bin/python  # the lock's environment has packaging; python3 may not
[[ -x "$PY" ]] || PY=python3
"$PY" scripts/deps/lower_bounds.py transformers av > logs/ci-oldest-pins/constraints.txt
echo "oldest lane holds: $(paste -sd' ' logs/ci-oldest-pins/constraints.txt)"
exec bash .ci/release_lane.sh oldest -c logs/ci-oldest-pins/constraints.txt
