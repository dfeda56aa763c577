#!/usr/bin/env bash
# Stage 2 (SFT), 128 frames, max length 3072, from stage 1's output (the architecture comes from its config).
# MODEL [checkpoints/slowfast-qwen2-7b-frame128-s2t4-pretrain], DATA_PATH, VIDEO_DIR,
# OUTPUT_DIR [checkpoints/slowfast-qwen2-7b-frame128-s2t4]; launch settings: see scripts/launch_train.sh.
source "$(dirname "${BASH_SOURCE[0]}")/../launch_train.sh"
export MODEL="${MODEL:-checkpoints/slowfast-qwen2-7b-frame128-s2t4-pretrain}"
export OUTPUT_DIR="${OUTPUT_DIR:-checkpoints/slowfast-qwen2-7b-frame128-s2t4}"
launch_train "${FINETUNE_ARGS[@]}" --model_max_length 3072 \
    --video_frames 128 --fast_token_temporal_sampling_stride 2 --fast_token_temporal_stride 4 \
    -- "$@"
