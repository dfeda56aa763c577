#!/usr/bin/env bash
# The GPU check a maintainer runs on a CUDA machine, from the repository root or anywhere:
#
#   scripts/check_gpu.sh [OUT_DIR]
#
# 1. the machine: nvidia-smi, python/torch/CUDA/cuDNN/transformers/flash-attn versions;
# 2. the tests: `pytest -m cuda tests/test_cuda.py` ( the reference fixture on CUDA in fp32/bf16/fp16, and
#    flash-attn against SDPA when it is installed) and tests/test_flash_varlen.py (the flash-attn packing against
#    a PyTorch stand-in of the kernel);
# 3. the CLI on the tiny checkpoint on CUDA (README's first command), again with --use-flash-attn when installed;
# 4. `python -m benchmarks --released-shape --device cuda` (by default the benchmarks that build the released
#    model: prefill, decode, vision; video decoding and the training step do not depend on the GPU's shape);
# 5. vLLM, when an environment with its CUDA build exists (VLLM_PYTHON): the plugin's exactness tests on CUDA and
#    the serve benchmark with vLLM beside the project's server (skipped, saying why, otherwise).
#
# It runs from the checkout as it is, without installing the project (the checkout goes on PYTHONPATH), on a
# machine that has Python with torch, transformers (>= 5.4), timm and accelerate, such as the lent GPU machine's
# image (Python 3.12, torch 2.11.0, transformers 5.17.0; no PyAV, no pytest, no network). What it lacks of PyAV and
# pytest is installed offline from .gpu-wheels/ (written here by scripts/deps/gpu_wheels.sh, carried with the tree)
# into OUT_DIR/site, leaving the machine's environment as it is. On the device tool, one call:
#
#   run(command="bash scripts/check_gpu.sh $OUT/check_gpu", carry=[".gpu-wheels"], timeout_s=600)
#
# Expected to take a few minutes on one GPU (not measured yet: no GPU was at hand when it was written); each step
# has a time limit, under 9.5 minutes for all of them together. Stops at the first failure (exit 1) naming the step
# and its log; exit 2 when torch sees no CUDA GPU (nothing is checked). Everything is logged to
# OUT_DIR/check_gpu.log (default /tmp/check_gpu-<date>) and the run ends with a summary to paste into a note.
#
# Environment [default]: PYTHON [.venv/bin/python if present, else python3]; GPU_WHEELS [.gpu-wheels]; BENCH_ONLY
# [prefill,decode,vision; "all" for the whole suite]; time limits in seconds: TEST_TIMEOUT [150] for the cuda tests,
# FLASH_TEST_TIMEOUT [60], CLI_TIMEOUT [60] per CLI run, BENCH_TIMEOUT [200]. CHECK_DEVICE=cpu runs every step on
# the CPU instead (the cuda tests then skip, the benchmarks run --smoke): tests/test_check_gpu.py does, so that the
# script's own logic is tested without a GPU.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT_DIR="${1:-/tmp/check_gpu-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT_DIR" || { echo "FAIL: cannot create $OUT_DIR" >&2; exit 1; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/check_gpu.log"
: >"$LOG"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
BENCH_ONLY="${BENCH_ONLY:-prefill,decode,vision}"
TEST_TIMEOUT="${TEST_TIMEOUT:-150}"
FLASH_TEST_TIMEOUT="${FLASH_TEST_TIMEOUT:-60}"
CLI_TIMEOUT="${CLI_TIMEOUT:-60}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-200}"
DEVICE="${CHECK_DEVICE:-cuda}"
[[ "$DEVICE" == cuda || "$DEVICE" == cpu ]] || { echo "FAIL: CHECK_DEVICE must be cuda or cpu, not '$DEVICE'" >&2; exit 1; }
GPU_WHEELS="${GPU_WHEELS:-$ROOT/.gpu-wheels}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's llava, tests and benchmarks, uninstalled
QUESTION="What color is the circle?"

SUMMARY=()   # lines of the final summary
SKIPPED=()   # what was not checked, and why
STARTED=$SECONDS

say() { printf '%s\n' "$*" | tee -a "$LOG"; }
note() { SUMMARY+=("$*"); }
skip() { SKIPPED+=("$*"); say "SKIP: $*"; }

print_summary() {
    say ""
    say "==== check_gpu summary ($(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - STARTED)) s) ===="
    local line
    for line in "${SUMMARY[@]}"; do say "$line"; done
    if ((${#SKIPPED[@]})); then
        say "not checked:"
        for line in "${SKIPPED[@]}"; do say "  - $line"; done
    fi
    say "log: $LOG"
}

fail() {  # fail STEP MESSAGE...: stop here
    local step="$1"; shift
    say ""
    say "FAIL [$step]: $*"
    note "FAILED at step '$step': $*"
    print_summary
    exit 1
}

# run_step NAME TIMEOUT LOGFILE COMMAND...: run with a time limit, output to LOGFILE (and the main log); sets RC.
run_step() {
    local name="$1" limit="$2" logfile="$3"; shift 3
    say ""
    say "---- $name (limit ${limit} s) ----"
    say "\$ $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$logfile"
    RC=${PIPESTATUS[0]}
    STEP_SECONDS=$((SECONDS - start))
    cat "$logfile" >>"$LOG"
    if ((RC == 124 || RC == 137)); then
        fail "$name" "did not finish within ${limit} s (the limits are set in the environment, see the" \
            "header); output: $logfile"
    fi
}

# pytest's final line ("3 passed, 2 skipped in 4.1s") and its skip reasons, counted.
pytest_result() {
    local logfile="$1"
    grep -E '^=*.*[0-9]+ (passed|failed|skipped|deselected|error)' "$logfile" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//'
}
pytest_skips() {
    grep -E '^SKIPPED \[[0-9]+\]' "$1" \
        | sed -E 's/^SKIPPED \[([0-9]+)\] [^:]+:[0-9]+: /\1\t/' \
        | awk -F'\t' '{n[$2] += $1} END {for (r in n) printf "%d test(s): %s\n", n[r], r}'
}

# ---- 1. the machine --------------------------------------------------------------------------------------------
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
git diff --quiet HEAD 2>/dev/null || COMMIT+=" with local changes"
say "==== scripts/check_gpu.sh: $(date -u '+%Y-%m-%d %H:%M UTC'), $(hostname), commit $COMMIT ===="
say "output: $OUT_DIR"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi 2>&1 | tee -a "$LOG"
    GPU_LINE="$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
        2>/dev/null | head -n 1)"
    note "gpu (nvidia-smi): ${GPU_LINE:-?}"
else
    say "nvidia-smi: not found on PATH"
    note "gpu (nvidia-smi): nvidia-smi not found"
fi

ENV_REPORT="$("$PY" - <<'EOF' 2>&1
import platform
import sys

try:
    import torch
    import transformers
except Exception as err:  # the environment is not set up: say so and stop
    print(f"python {platform.python_version()}: cannot import torch/transformers ({err})")
    sys.exit(4)
cuda = torch.cuda.is_available()
cudnn = torch.backends.cudnn.version() if cuda else None
print(f"python {platform.python_version()}, torch {torch.__version__} (built for CUDA {torch.version.cuda}, "
      f"cuDNN {cudnn}), transformers {transformers.__version__}")
try:
    import flash_attn
    from flash_attn import flash_attn_varlen_func  # noqa: F401  (what llava.model.hybrid_layer imports)
    print(f"flash-attn {flash_attn.__version__}")
    flash = "yes"
except Exception as err:
    print(f"flash-attn: not usable ({type(err).__name__}: {str(err)[:160]})")
    flash = "no"
if not cuda:
    print("torch sees no CUDA device")
    sys.exit(3)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
          f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
print(f"FLASH_ATTN={flash}")
EOF
)"
ENV_RC=$?
printf '%s\n' "$ENV_REPORT" | grep -v '^FLASH_ATTN=' | tee -a "$LOG"
while IFS= read -r line; do [[ "$line" != FLASH_ATTN=* ]] && note "$line"; done <<<"$ENV_REPORT"
if ((ENV_RC == 3)) && [[ "$DEVICE" == cuda ]]; then
    say ""
    say "NO GPU: torch sees no CUDA device (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}); nothing was" \
        "checked. Run this on a machine with an NVIDIA GPU and a CUDA build of torch."
    SKIPPED+=("everything: no CUDA device")
    print_summary
    exit 2
elif ((ENV_RC != 0 && ENV_RC != 3)); then
    fail environment "$PY cannot report the environment (exit $ENV_RC): $ENV_REPORT"
fi
FLASH="$(sed -n 's/^FLASH_ATTN=//p' <<<"$ENV_REPORT")"
[[ "$DEVICE" == cuda ]] || FLASH=no
[[ "$DEVICE" == cuda ]] || note "CHECK_DEVICE=cpu: every step on the CPU (the script's own check; nothing CUDA is checked)"

# ---- 1b. what the machine lacks: PyAV (the CLI's video) and pytest, offline from the wheel folder ----------------
say ""
say "---- prerequisites (pytest, av) ----"
SITE="$("$ROOT/scripts/deps/gpu_prereqs.sh" "$PY" "$GPU_WHEELS" "$OUT_DIR/site" pytest av 2>>"$LOG")" \
    || fail prerequisites "$(tail -n 1 "$LOG")"
if [[ -n "$SITE" ]]; then
    export PYTHONPATH="$SITE:$PYTHONPATH"
    note "installed offline from $GPU_WHEELS into $SITE: $(cd "$SITE" && ls -d *.dist-info | sed 's/.dist-info//' | paste -sd' ')"
fi
note "$("$PY" -c 'import av, pytest; print(f"PyAV {av.__version__}, pytest {pytest.__version__}")' 2>&1)"

# ---- 2. the tests ----------------------------------------------------------------------------------------------
run_step "tests marked cuda" "$TEST_TIMEOUT" "$OUT_DIR/pytest_cuda.log" \
    "$PY" -m pytest -q -x -rs -p no:cacheprovider -m cuda tests/test_cuda.py
RESULT="$(pytest_result "$OUT_DIR/pytest_cuda.log")"
((RC == 0)) || fail "tests marked cuda" "${RESULT:-pytest exit $RC}; see $OUT_DIR/pytest_cuda.log"
say "${RESULT}"
note "pytest -m cuda tests/test_cuda.py: ${RESULT} (${STEP_SECONDS} s)"
while IFS= read -r line; do [[ -n "$line" ]] && skip "$line"; done < <(pytest_skips "$OUT_DIR/pytest_cuda.log")

run_step "flash-attn packing tests (CPU stand-in)" "$FLASH_TEST_TIMEOUT" "$OUT_DIR/pytest_flash.log" \
    "$PY" -m pytest -q -x -rs -p no:cacheprovider tests/test_flash_varlen.py
RESULT="$(pytest_result "$OUT_DIR/pytest_flash.log")"
((RC == 0)) || fail "flash-attn packing tests" "${RESULT:-pytest exit $RC}; see $OUT_DIR/pytest_flash.log"
say "${RESULT}"
note "pytest tests/test_flash_varlen.py: ${RESULT} (${STEP_SECONDS} s)"

# ---- 3. the CLI on the tiny checkpoint -------------------------------------------------------------------------
[[ -f assets/tiny-slowfast/model.safetensors && -f assets/demo.mp4 ]] \
    || fail cli "assets/tiny-slowfast or assets/demo.mp4 is missing from the checkout"
cli_run() {  # cli_run LABEL EXTRA_ARGS...
    local label="$1"; shift
    run_step "cli ($label)" "$CLI_TIMEOUT" "$OUT_DIR/cli_$label.log" \
        "$PY" -m llava.serve.cli --model-path assets/tiny-slowfast --video assets/demo.mp4 \
        --question "$QUESTION" --device "$DEVICE" --verbose "$@"
    local logfile="$OUT_DIR/cli_$label.log"
    ((RC == 0)) || fail "cli ($label)" "exit $RC; see $logfile"
    local loading
    loading="$(grep -m1 '^model loading:' "$logfile")"
    [[ "$loading" == *"($DEVICE"* ]] || fail "cli ($label)" "the model did not load on $DEVICE: '${loading:-no timing line}'"
    local timings
    timings="$(grep -E '^(model loading|video decoding|vision encoding|prefill|decode|tokens):' "$logfile")"
    note "cli ($label), ${STEP_SECONDS} s in all:"
    while IFS= read -r line; do note "    $line"; done <<<"$timings"
}
cli_run sdpa
if [[ "$FLASH" == yes ]]; then
    cli_run flash-attn --use-flash-attn
else
    skip "cli with --use-flash-attn: flash-attn is not installed (pip install -e '.[gpu]')"
fi

# ---- 4. the benchmarks at the released shape ---------------------------------------------------------------------
BENCH_ARGS=(--released-shape --device cuda --out "$OUT_DIR/benchmarks")
[[ "$DEVICE" == cuda ]] || BENCH_ARGS=(--smoke --device cpu --out "$OUT_DIR/benchmarks")
if [[ "$BENCH_ONLY" != all ]]; then
    BENCH_ARGS+=(--only "$BENCH_ONLY")
    OTHERS="$("$PY" -m benchmarks --list | awk '{print $1}' \
        | grep -vxF -f <(tr ',' '\n' <<<"$BENCH_ONLY") | paste -sd, -)"
    [[ -n "$OTHERS" ]] && skip "benchmarks $OTHERS (BENCH_ONLY=$BENCH_ONLY; BENCH_ONLY=all runs every one)"
fi
run_step "benchmarks ${BENCH_ARGS[0]}" "$BENCH_TIMEOUT" "$OUT_DIR/benchmarks.log" "$PY" -m benchmarks "${BENCH_ARGS[@]}"
((RC == 0)) || fail benchmarks "exit $RC; see $OUT_DIR/benchmarks.log"
note "python -m benchmarks ${BENCH_ARGS[*]}: ${STEP_SECONDS} s; tables above, from $OUT_DIR/benchmarks/results.md"
say ""
tee -a "$LOG" <"$OUT_DIR/benchmarks/results.md"

# ==== packed training  ===================================================================================
# Packed against unpacked training on a length mix like LLaVA-Video SFT's (benchmarks/train_packing.py), at the
# released shape: a Qwen2-0.5B-shaped LM with the released ConvNeXt-XXL tower (frozen) at 576 px, 64-frame videos,
# bf16, flash-attn's varlen kernel for the packed rows when it is installed (else SDPA with a block-diagonal mask).
# The cuda tests above include tests/test_packing.py's packed-vs-alone losses with the real kernel.
# Environment: PACKING_BENCH_TIMEOUT [300] seconds; PACKING_BENCH=0 leaves it out.
PACKING_BENCH_TIMEOUT="${PACKING_BENCH_TIMEOUT:-300}"
if [[ "${PACKING_BENCH:-1}" == 0 ]]; then
    skip "packed training benchmark (PACKING_BENCH=0)"
elif [[ "$BENCH_ONLY" == all || ",$BENCH_ONLY," == *",train,"* ]]; then
    note "packed training: in the benchmarks above (train)"
else
    PACKING_ARGS=(--released-shape --device cuda --only train --out "$OUT_DIR/benchmarks-train")
    [[ "$DEVICE" == cuda ]] || PACKING_ARGS=(--smoke --device cpu --only train --out "$OUT_DIR/benchmarks-train")
    run_step "packed vs. unpacked training" "$PACKING_BENCH_TIMEOUT" "$OUT_DIR/packing.log" \
        "$PY" -m benchmarks "${PACKING_ARGS[@]}"
    ((RC == 0)) || fail "packed vs. unpacked training" "exit $RC; see $OUT_DIR/packing.log"
    note "python -m benchmarks ${PACKING_ARGS[*]}: ${STEP_SECONDS} s; tables in $OUT_DIR/benchmarks-train/results.md"
    say ""
    tee -a "$LOG" <"$OUT_DIR/benchmarks-train/results.md"
fi
# ==== end of packed training ========================================================================================

# ---- 5. vLLM (the llava.vllm plugin) ------------------------------------------------- BEGIN vLLM block (issue 33)
# Needs vLLM's CUDA build in its own environment, VLLM_PYTHON [.venv-vllm-cuda/bin/python], made with
#   python3 -m venv .venv-vllm-cuda && .venv-vllm-cuda/bin/pip install vllm av pytest requests openai \
#     && .venv-vllm-cuda/bin/pip install --no-deps -e .
# The exactness tests compare vLLM on the GPU (float32) with the transformers model on the CPU; the serve benchmark
# runs the project's server and vLLM's on the GPU in one run. VLLM_TEST_TIMEOUT [420], VLLM_BENCH_TIMEOUT [420].
VLLM_PY="${VLLM_PYTHON:-.venv-vllm-cuda/bin/python}"
if [[ -x "$VLLM_PY" ]]; then
    run_step "vLLM exactness tests (CUDA)" "${VLLM_TEST_TIMEOUT:-420}" "$OUT_DIR/pytest_vllm.log" \
        env SLOWFAST_REFERENCE_PYTHON="$PY" "$VLLM_PY" -m pytest -o addopts=-ra --confcutdir=tests/vllm_plugin \
        tests/vllm_plugin -q
    RESULT="$(pytest_result "$OUT_DIR/pytest_vllm.log")"
    ((RC == 0)) || fail "vLLM exactness tests" "${RESULT:-exit $RC}; see $OUT_DIR/pytest_vllm.log"
    note "pytest tests/vllm_plugin (vLLM on CUDA): ${RESULT} (${STEP_SECONDS} s)"
    run_step "serve benchmark, project server and vLLM" "${VLLM_BENCH_TIMEOUT:-420}" "$OUT_DIR/bench_vllm.log" \
        env SLOWFAST_VLLM_PYTHON="$VLLM_PY" "$PY" -m benchmarks --only serve --device cuda --out "$OUT_DIR/bench_vllm"
    ((RC == 0)) || fail "serve benchmark with vLLM" "exit $RC; see $OUT_DIR/bench_vllm.log"
    note "python -m benchmarks --only serve --device cuda (with vLLM): ${STEP_SECONDS} s; $OUT_DIR/bench_vllm/results.md"
    tee -a "$LOG" <"$OUT_DIR/bench_vllm/results.md"
else
    skip "vLLM: no environment with vLLM's CUDA build at $VLLM_PY (VLLM_PYTHON; see the commands in this step)"
fi
# ---- END vLLM block ---------------------------------------------------------------------------------------------

print_summary
exit 0
