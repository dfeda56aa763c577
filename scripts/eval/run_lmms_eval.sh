#!/usr/bin/env bash
# Score a Slow-Fast checkpoint on one lmms-eval task with the `slowfast_videomllm` plugin.
#
#   scripts/eval/run_lmms_eval.sh TASK [extra lmms-eval arguments...]
#
# Environment (all optional):
#   CKPT          checkpoint folder or hub id   (default: the released 64-frame model)
#   NUM_FRAMES    frames per video              (default: from the checkpoint's name, frame64/96/128;
#                                                otherwise the checkpoint's own video_frames)
#   NUM_PROCESSES data-parallel processes       (default: one per visible GPU, 1 without GPUs)
#   BATCH_SIZE    requests per forward pass     (default 1)
#   PROTOCOL      default | reference           (default: default; reference = the reference wrapper's
#                                                settings, which produced the reported numbers: PyAV at
#                                                2 fps, fp16, centre-cropped images, reference decoding and
#                                                generation settings; see docs/evaluation.md, "Evaluation protocols")
#   DECODE_MODE   reference | attend            (default: the protocol's; set, it wins over the protocol)
#   BACKEND       decord | pyav                 (default: the protocol's; set, it wins over the protocol)
#   EXTRA_MODEL_ARGS more model arguments, last  (e.g. dtype=float32,max_new_tokens=32; they win)
#   OUTPUT_DIR    where results are written     (default logs/eval)
#   MAIN_PORT     accelerate's rendezvous port  (default 29517)
# Extra arguments go to lmms-eval last, so they win (e.g. --limit 8, --log_samples).
# Exit status: non-zero when lmms-eval fails, logs an evaluation error or writes no results file.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 TASK [extra lmms-eval arguments...]" >&2
    exit 2
fi
TASK="$1"
shift

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

CKPT="${CKPT:-shi-labs/slowfast-video-mllm-qwen2-7b-convnext-576-frame64-s1t4}"
if [[ -z "${NUM_FRAMES:-}" ]]; then
    case "$CKPT" in
        *frame128*) NUM_FRAMES=128 ;;
        *frame96*) NUM_FRAMES=96 ;;
        *frame64*) NUM_FRAMES=64 ;;
        *) NUM_FRAMES="" ;;
    esac
fi
if [[ -z "${NUM_PROCESSES:-}" ]]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        NUM_PROCESSES="$(nvidia-smi -L | wc -l)"
    else
        NUM_PROCESSES=1
    fi
fi
BATCH_SIZE="${BATCH_SIZE:-1}"
PROTOCOL="${PROTOCOL:-default}"
OUTPUT_DIR="${OUTPUT_DIR:-logs/eval}"
PYTHON="${PYTHON:-python}"

MODEL_ARGS="pretrained=${CKPT},protocol=${PROTOCOL},batch_size=${BATCH_SIZE}"
if [[ -n "${BACKEND:-}" ]]; then
    MODEL_ARGS="${MODEL_ARGS},video_decode_backend=${BACKEND}"
fi
if [[ -n "${DECODE_MODE:-}" ]]; then
    MODEL_ARGS="${MODEL_ARGS},cross_attn_decode_mode=${DECODE_MODE}"
fi
if [[ -n "$NUM_FRAMES" ]]; then
    MODEL_ARGS="${MODEL_ARGS},num_frames=${NUM_FRAMES}"
fi
if [[ -n "${EXTRA_MODEL_ARGS:-}" ]]; then
    MODEL_ARGS="${MODEL_ARGS},${EXTRA_MODEL_ARGS}"
fi
LOG_NAME="$(basename "$CKPT")_${TASK}_f${NUM_FRAMES:-cfg}_${PROTOCOL}"

LMMS_ARGS=(--model slowfast_videomllm --model_args "$MODEL_ARGS" --tasks "$TASK"
    --batch_size "$BATCH_SIZE" --log_samples --log_samples_suffix "$LOG_NAME" --output_path "$OUTPUT_DIR")

echo "lmms-eval: task ${TASK}, checkpoint ${CKPT}, frames ${NUM_FRAMES:-from config}, protocol ${PROTOCOL}, ${NUM_PROCESSES} process(es)"
# lmms-eval exits 0 after an error inside a task; checked_run makes that (or a missing results file) a failure
# with the reason on the last line.
if [[ "$NUM_PROCESSES" -gt 1 ]]; then
    exec "$PYTHON" -m llava.eval.checked_run -- "$PYTHON" -m accelerate.commands.launch --num_processes "$NUM_PROCESSES" \
        --main_process_port "${MAIN_PORT:-29517}" -m lmms_eval "${LMMS_ARGS[@]}" "$@"
fi
exec "$PYTHON" -m llava.eval.checked_run -- "$PYTHON" -m lmms_eval "${LMMS_ARGS[@]}" "$@"
