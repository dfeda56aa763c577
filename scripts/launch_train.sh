#!/usr/bin/env bash
# Shared launcher for the training recipes: `launch_train STAGE_ARGS... -- EXTRA_ARGS...`.
# Paths and launch settings come from the environment (defaults in brackets):
#   MODEL, DATA_PATH, VIDEO_DIR, IMAGE_DIR [VIDEO_DIR], OUTPUT_DIR, NPROC_PER_NODE [GPUs, or 2 on CPU],
#   NNODES [1], NODE_RANK [0], MASTER_ADDR [127.0.0.1], MASTER_PORT [29500], DEEPSPEED [the recipe's],
#   PYTHON [python3].
# Extra arguments go to the trainer after the recipe's, so they win.
# Without CUDA the same recipe runs on CPU: DeepSpeed over gloo, no bf16/tf32.
set -euo pipefail
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

launch_train() {
    local recipe=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do recipe+=("$1"); shift; done
    [[ $# -gt 0 ]] && shift
    : "${MODEL:?set MODEL to the starting checkpoint}"
    : "${DATA_PATH:?set DATA_PATH to the annotation file (JSON or JSONL)}"
    : "${OUTPUT_DIR:?set OUTPUT_DIR}"
    local video_dir="${VIDEO_DIR:-}" image_dir="${IMAGE_DIR:-${VIDEO_DIR:-}}"
    local device_args=()
    local python="${PYTHON:-python3}"
    if "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        local gpus
        gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())')
        NPROC_PER_NODE="${NPROC_PER_NODE:-$gpus}"
        device_args=(--bf16 True --tf32 True)
    else
        NPROC_PER_NODE="${NPROC_PER_NODE:-2}"
        export DS_ACCELERATOR=cpu
        device_args=(--use_cpu True --ddp_backend gloo --bf16 False --tf32 False)
    fi
    local paths=(--model_name_or_path "$MODEL" --data_path "$DATA_PATH" --output_dir "$OUTPUT_DIR")
    [[ -n "$video_dir" ]] && paths+=(--video_folder "$video_dir")
    [[ -n "$image_dir" ]] && paths+=(--image_folder "$image_dir")
    [[ -n "${DEEPSPEED:-}" ]] && recipe+=(--deepspeed "$DEEPSPEED")
    exec "$python" -m torch.distributed.run \
        --nproc_per_node "$NPROC_PER_NODE" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
        --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
        -m llava.train.train "${paths[@]}" "${recipe[@]}" "${device_args[@]}" "$@"
}

# The reference's recipes (its scripts/pretrain and scripts/finetune at commit 69676a1): stage 1 trains the
# projector and the cross-attention parameters from Qwen2-7B-Instruct + the CLIP ConvNeXt-XXL, stage 2 trains
# everything. The per-recipe settings (frames, fast-token strides, and stage 2's max length: 4096 at 64 frames,
# 3072 at 96 and 128) are in the recipe scripts. Stage 1 leaves images unpadded ('square'): the reference's
# pretrain scripts do not pass --image_aspect_ratio, whose default there is 'square'; its SFT scripts pass 'pad'.
# The loss is averaged per micro-batch (--loss_reduction micro_batch, the trainer's default), as under the
# reference's transformers 4.45.
PRETRAIN_ARGS=(
    --deepspeed "$SCRIPTS_DIR/zero2.json" --version qwen_1_5
    --vision_tower convnext-576 --vision_tower_pretrained convnext_xxlarge.clip_laion2b_soup
    --mm_projector_type mlp2x_gelu --mm_vision_select_layer -2
    --mm_use_im_start_end False --mm_use_im_patch_token False --image_aspect_ratio square
    --tune_mm_mlp_adapter True --initialize_cross_attn_kv_from_lm True
    --cross_attn_every_n_layers 8 --cross_attn_implementation text-only-vanilla-flashattn
    --cross_attn_gating_type whole-dynamic-tanh-warmup --mm_video_pooling_stride 2
    --fps 4 --min_fast_frames 16 --fast_token_spatial_stride 1
    --learning_rate 1e-3 --mm_projector_lr 1e-3 --cross_attention_layer_lr 2e-4
    --per_device_train_batch_size 2 --gradient_accumulation_steps 2 --model_max_length 3072
    --num_train_epochs 1 --lr_scheduler_type cosine --warmup_ratio 0.03 --weight_decay 0.0
    --gradient_checkpointing True --save_strategy steps --save_steps 1000 --save_total_limit 1
    --logging_steps 1 --dataloader_num_workers 8 --lazy_preprocess True --report_to none
)
# Stage 2 keeps the architecture of stage 1's checkpoint; the slow/fast options the recipes repeat (as the
# reference's do) are set over its config.
FINETUNE_ARGS=(
    --deepspeed "$SCRIPTS_DIR/zero3.json" --version qwen_1_5 --image_aspect_ratio pad
    --fps 4 --min_fast_frames 16 --mm_video_pooling_stride 2 --fast_token_spatial_stride 1
    --learning_rate 2e-5 --per_device_train_batch_size 1 --gradient_accumulation_steps 2
    --group_by_modality_length True
    --num_train_epochs 1 --lr_scheduler_type cosine --warmup_ratio 0.03 --weight_decay 0.0
    --gradient_checkpointing True --save_strategy steps --save_steps 500 --save_total_limit 1
    --logging_steps 1 --dataloader_num_workers 12 --lazy_preprocess True --report_to none
)
