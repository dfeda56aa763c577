#!/usr/bin/env bash
# Download, as wheels, what scripts/check_gpu.sh needs beyond the lent GPU machine's image (Python 3.12 with torch,
# transformers, timm and accelerate; no PyAV, no pytest, and no network there) into .gpu-wheels/ (gitignored).
# The device tool carries that folder with the working tree (`carry: [".gpu-wheels"]`; 64 MiB in all, these wheels
# about 40 MB), and check_gpu.sh installs from it offline (scripts/deps/gpu_prereqs.sh).
#
#   scripts/deps/gpu_wheels.sh [DEST]        # DEST default .gpu-wheels
#
# Environment: GPU_PYTHON_VERSION [3.12], GPU_PLATFORM [manylinux_2_28_x86_64].
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
DEST="${1:-.gpu-wheels}"
# PyAV and pytest at the lock's versions (constraints.txt: what the suite passed with), with their dependencies.
REQUIREMENTS=(av pytest)
rm -rf "$DEST"
mkdir -p "$DEST"
python3 -m pip download --quiet --dest "$DEST" -c constraints.txt --only-binary=:all: --implementation cp \
    --python-version "${GPU_PYTHON_VERSION:-3.12}" --platform "${GPU_PLATFORM:-manylinux_2_28_x86_64}" \
    "${REQUIREMENTS[@]}"
echo "downloaded ${REQUIREMENTS[*]} and their dependencies into $DEST ($(du -sh "$DEST" | cut -f1)):"
ls "$DEST"
