#!/usr/bin/env bash
# Stage 2 (SFT), 64 frames, max length 4096, from stage 1's output (the architecture comes from its config).
# MODEL [checkpoints/slowfast-qwen2-7b-frame64-s1t4-pretrain], DATA_PATH, VIDEO_DIR,
# OUTPUT_DIR [checkpoints/slowfast-qwen2-7b-frame64-s1t4]; launch settings: see scripts/launch_train.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../launch_train.sh"
export MODEL="${MODEL:-checkpoints/slowfast-qwen2-7b-frame64-s1t4-pretrain}"
export OUTPUT_DIR="${OUTPUT_DIR:-checkpoints/slowfast-qwen2-7b-frame64-s1t4}"
launch_train "${FINETUNE_ARGS[@]}" --model_max_length 4096 \
    --video_frames 64 --fast_token_temporal_sampling_stride 1 --fast_token_temporal_stride 4 \
    -- "$@"
