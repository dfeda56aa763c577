#!/usr/bin/env bash
# A lane that installs the project WITHOUT the lock (constraints.txt), from pyproject.toml's ranges alone, and runs
# the tests that depend most on the libraries' releases: the model, generation, video, CLI and server tests.
# Called by .ci/lane_newest.sh and .ci/lane_oldest.sh:
#
#   .ci/release_lane.sh NAME [pip install arguments...]     (e.g. -c FILE to hold some packages at a version)
#
# The environment is .venv-ci-NAME; its `pip freeze` and its drift against constraints.txt go to logs/ci-NAME/.
# A failure ends with the packages whose versions differ from the lock, which is what moved.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME="$1"; shift
VENV=".venv-ci-$NAME"
OUT="logs/ci-$NAME"
TESTS=(
    tests/test_reference_parity.py tests/test_generation.py tests/test_transformers_api.py tests/test_common_model.py
    tests/test_hybrid_layer.py tests/test_slow_fast.py tests/test_cross_attn_query.py tests/test_slow_positions.py
    tests/test_config.py tests/test_vision_tower.py tests/test_builder.py tests/test_tokenizer_utils.py
    tests/test_video.py tests/test_cli.py tests/test_api.py tests/test_tensor_parallel.py
)
START=$SECONDS
rm -rf "$VENV" "$OUT"
mkdir -p "$OUT"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet "$@" -e ".[test]"
"$VENV/bin/pip" freeze --all --exclude-editable | LC_ALL=C sort -f > "$OUT/freeze.txt"
"$VENV/bin/python" scripts/deps/drift.py "$OUT/freeze.txt" > "$OUT/drift.txt"
"$VENV/bin/python" -c 'import torch, transformers, av; print(f"lane '"$NAME"': torch {torch.__version__}, transformers {transformers.__version__}, av {av.__version__}")'
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
STATUS=$?
set -e
if ((STATUS != 0)); then
    echo "lane $NAME FAILED (pytest exit $STATUS). Against constraints.txt, what this environment has:" >&2
    cat "$OUT/drift.txt" >&2
else
    echo "lane $NAME passed in $((SECONDS - START)) s; $(head -n 1 "$OUT/drift.txt")"
fi
exit "$STATUS"
