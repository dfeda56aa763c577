#!/usr/bin/env bash
# Stage 1 (pretrain), 128 frames, fast-token temporal sampling stride 2, temporal stride 4.
# MODEL [Qwen/Qwen2-7B-Instruct], DATA_PATH, VIDEO_DIR, OUTPUT_DIR [checkpoints/slowfast-qwen2-7b-frame128-s2t4-pretrain];
# launch settings: see scripts/launch_train.sh. Extra arguments are passed to the trainer and win.
source "$(dirname "${BASH_SOURCE[0]}")/../launch_train.sh"
export MODEL="${MODEL:-Qwen/Qwen2-7B-Instruct}"
export OUTPUT_DIR="${OUTPUT_DIR:-checkpoints/slowfast-qwen2-7b-frame128-s2t4-pretrain}"
launch_train "${PRETRAIN_ARGS[@]}" \
    --video_frames 128 --fast_token_temporal_sampling_stride 2 --fast_token_temporal_stride 4 \
    -- "$@"
