#!/usr/bin/env bash
# Run the ten benchmarks of the reported table one after another (same environment variables as
# run_lmms_eval.sh; extra arguments go to every run).
set -euo pipefail
HERE="$(dirname "${BASH_SOURCE[0]}")"
for bench in videomme videomme_w_subtitle mlvu mvbench egoschema longvideobench perceptiontest nextqa activitynetqa tempcompass; do
    "$HERE/$bench.sh" "$@"
done
