#!/usr/bin/env bash
# Drift check for maintainers: build a new environment from pyproject.toml's ranges alone (no constraints.txt),
# so every package is the newest release those ranges admit today, list what moved against constraints.txt,
# and run the test suite in it. A failure here is what a user who installs without the lock meets next.
#
#   scripts/deps/check_latest.sh [pytest arguments...]
#
# Environment (optional):
#   PYTHON        interpreter for the new environment (default python3)
#   LIFT_UPPER=1  also upgrade the packages that pyproject.toml caps (transformers, timm, av, lmms-eval,
#                 filelock, gradio) past their caps, to see whether a cap can be raised
#   OUT           folder for the report (default logs/deps-latest)
#   EXTRAS        extras to install (default train,eval,test,bench,demo,serve)
# Exit status: the test suite's (0 when the newest releases pass).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-logs/deps-latest}"
mkdir -p "$OUT"
VENV="$(mktemp -d)/venv"
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/pip" install --quiet -e ".[${EXTRAS:-train,eval,test,bench,demo,serve}]"
if [[ "${LIFT_UPPER:-0}" == "1" ]]; then
    CAPPED="$("$VENV/bin/python" - <<'PY'
import tomllib
from packaging.requirements import Requirement
data = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(data["dependencies"]) + [r for name, extra in data["optional-dependencies"].items() if name != "gpu" for r in extra]
print(" ".join(sorted({Requirement(r).name for r in reqs if any(s.operator in ("<", "<=") for s in Requirement(r).specifier)})))
PY
)"
    echo "lifting the caps of: $CAPPED"
    # pip warns that slowfast-llava's ranges are not met; that is the point of this mode.
    "$VENV/bin/pip" install --quiet --upgrade $CAPPED || true
fi
"$VENV/bin/pip" freeze --all --exclude-editable | grep -viE '^(pip|slowfast-llava)==' | LC_ALL=C sort -f > "$OUT/latest.txt"

"$VENV/bin/python" scripts/deps/drift.py "$OUT/latest.txt" | tee "$OUT/drift.txt"

set +e
"$VENV/bin/python" -m pytest -q "$@" 2>&1 | tee "$OUT/pytest.txt"
STATUS=${PIPESTATUS[0]}
set -e
echo "drift check: tests exited ${STATUS}; report in ${OUT}/ (drift.txt, latest.txt, pytest.txt)"
exit "$STATUS"
