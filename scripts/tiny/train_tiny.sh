#!/usr/bin/env bash
# Train a tiny Slow-Fast model from nothing, on CPU (2 cores: about an hour; REFINE_STEPS=0, about 35 minutes), the
# recipe of assets/tiny-slowfast: slow tokens at the tower's full grid with their time and place
# (fourier_spacetime), hybrid layers that query them with a projection of their own (--cross_attn_query_source
# own), every question of each training video, then a refining stage that also asks which shape has each colour,
# on training videos most of which show a flash (docs/tiny-model.md).
#
#   bash scripts/tiny/train_tiny.sh [OUT]          # default OUT: checkpoints/tiny-slowfast
#
# Stages (each skipped when its output already exists, so a stopped run resumes at the stage it was in):
#   0. data:  the synthetic moving-shapes task, train / val / test splits rendered separately
#             (playground/synthetic_data.py), into $WORK/data (the training split asking every question:
#             $WORK/data-all-questions, $WORK/data-all-shape-questions or $WORK/data-all-shape-flash-questions);
#   1. tower: the tiny ConvNeXt pretrained on dense per-cell colour and shape labels
#             (playground/pretrain_tower.py): the stand-in for the released model's CLIP tower;
#   2. base:  a randomly initialised Qwen2 language model and a small byte-level BPE tokenizer
#             (python -m llava.model.tiny --base);
#   3. sft:   one stage of supervised fine-tuning of everything but the tower, with the project's trainer
#             (llava/train/train.py) through scripts/launch_train.sh: 16 conversations per step whatever
#             the process count (2 processes by default, DDP over gloo on CPU);
#   3b. refine: the same fine-tuning again, from stage 3's weights with a fresh optimiser and schedule, on the
#             REFINE_QUESTIONS training split (REFINE_STEPS=0 skips it; the export is then stage 3's);
#   4. export: fp16 weights with the tokenizer in OUT, then test-split accuracy per family in OUT/eval_test.json.
#
# Environment: WORK [OUT.work] holds the data, tower and training output; VARIANT picks the architecture
# (slowfast [default], fast: no hybrid layers, slow: every slow token in the language model, no hybrid layers);
# SLOW_POSITIONS [fourier_spacetime] the slow tokens' position encoding (--slow_token_position_encoding: none,
# fourier, fourier_spacetime; slowfast only, the other variants have no slow path); SLOW_POOLING [1] the slow
# tokens' grid (1: the tower's 8 x 8 cells, 1,024 slow tokens a video; 2: pooled 2 x 2, 256; slowfast only, the
# other variants pool 2 x 2); CROSS_ATTN_QUERY [own] how the hybrid layers query the slow tokens (own: a
# projection without rotary embedding; self_attn: the published layer's, the self-attention's rotated query;
# slowfast only); QUESTIONS [all] per training video (all: every question it answers, in one conversation;
# all_shape: all, and a second conversation asking which shape has each colour; all_shape_flash: all_shape, the
# second conversation also asking the flash's colour where there is one; sampled: its primary question
# and up to two others, the data of every run before run 23); FLASH_RATE [0.3] the share of training videos
# not asked the flash first that show one anyway (another rate renders other training videos, in a folder of its
# own; val and test keep 0.3); SEED [0] of the training stage
# (initialisation and data order; the data, tower and base stay those of seed 0);
# EXTRA_TRAIN_ARGS [none] more trainer options, after the recipe's (so they win); PYTHON [python3];
# NPROC_PER_NODE [2]; THREADS [cores / NPROC_PER_NODE, per process]; MASTER_PORT [29500]. MAX_STEPS changes the
# schedule (README.md gives a 6,000-step run); the others are for smoke tests only (they change the result):
# MAX_STEPS [3000], TOWER_STEPS [2000], TRAIN_VIDEOS [8000], VAL_VIDEOS [200], TEST_VIDEOS [500].
# The refining stage: REFINE_STEPS [2000; 0: none], REFINE_QUESTIONS [all_shape_flash] and REFINE_FLASH_RATE [0.75]
# (as QUESTIONS and FLASH_RATE, for its training split). Each stage's run folder is named for its settings
# (MAX_STEPS other than 3000 included), so a run with other settings never reuses another's weights.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-checkpoints/tiny-slowfast}"
WORK="${WORK:-$OUT.work}"
VARIANT="${VARIANT:-slowfast}"
SLOW_POSITIONS="${SLOW_POSITIONS:-fourier_spacetime}"
SLOW_POOLING="${SLOW_POOLING:-1}"
QUESTIONS="${QUESTIONS:-all}"
FLASH_RATE="${FLASH_RATE:-0.3}"
REFINE_STEPS="${REFINE_STEPS:-2000}"
REFINE_QUESTIONS="${REFINE_QUESTIONS:-all_shape_flash}"
REFINE_FLASH_RATE="${REFINE_FLASH_RATE:-0.75}"
CROSS_ATTN_QUERY="${CROSS_ATTN_QUERY:-own}"
SEED="${SEED:-0}"
PYTHON="${PYTHON:-python3}"
MAX_STEPS="${MAX_STEPS:-3000}" TOWER_STEPS="${TOWER_STEPS:-2000}"
NPROC_PER_NODE="${NPROC_PER_NODE:-2}" GLOBAL_BATCH=16
if (( NPROC_PER_NODE < 1 || GLOBAL_BATCH % NPROC_PER_NODE != 0 )); then
    echo "error: NPROC_PER_NODE=$NPROC_PER_NODE must divide the global batch of $GLOBAL_BATCH" >&2; exit 2
fi
THREADS="${THREADS:-$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))}"
export PYTHON
cd "$ROOT"

# The task: 64x64 pixels, 16 frames at 8 fps.
SIZE=64 FRAMES=16 FPS=8
TRAIN_VIDEOS="${TRAIN_VIDEOS:-8000}" VAL_VIDEOS="${VAL_VIDEOS:-200}" TEST_VIDEOS="${TEST_VIDEOS:-500}"
# The model: ConvNeXt depths 1,1,1,1 / dims 16..64 at output stride 8 (an 8x8 grid, pooled 2x2 to 16 slow
# tokens per frame); Qwen2 with 4 layers of width 128.
TOWER_ARGS=(--image-size "$SIZE" --depths 1,1,1,1 --dims 16,32,48,64 --output-stride 8)
OVERRIDES="{\"depths\":[1,1,1,1],\"dims\":[16,32,48,64],\"image_size\":$SIZE,\"output_stride\":8}"

case "$QUESTIONS" in
    all|all_shape|all_shape_flash|sampled) ;;
    *) echo "error: QUESTIONS=$QUESTIONS: use all (every question of a training video), all_shape (all, and which shape has each colour), all_shape_flash (all_shape, and the flash again) or sampled (a few)" >&2; exit 2 ;;
esac
for rate in "FLASH_RATE=$FLASH_RATE" "REFINE_FLASH_RATE=$REFINE_FLASH_RATE"; do
    if ! [[ "${rate#*=}" =~ ^(0(\.[0-9]+)?|1(\.0+)?)$ ]]; then
        echo "error: $rate: use a share between 0 and 1, such as 0.3 or 0.75" >&2; exit 2
    fi
done
case "$REFINE_QUESTIONS" in
    all|all_shape|all_shape_flash|sampled) ;;
    *) echo "error: REFINE_QUESTIONS=$REFINE_QUESTIONS: use all, all_shape, all_shape_flash or sampled (as QUESTIONS)" >&2; exit 2 ;;
esac
for steps in "MAX_STEPS=$MAX_STEPS" "REFINE_STEPS=$REFINE_STEPS"; do
    if ! [[ "${steps#*=}" =~ ^[0-9]+$ ]]; then
        echo "error: $steps: use a whole number of steps" >&2; exit 2
    fi
done
if (( MAX_STEPS == 0 )); then echo "error: MAX_STEPS=0: the first training stage needs at least one step" >&2; exit 2; fi
if [[ "$VARIANT" != slowfast ]] && (( REFINE_STEPS > 0 )); then
    echo "error: REFINE_STEPS=$REFINE_STEPS: the refining stage is part of the slow-fast recipe; use REFINE_STEPS=0 with VARIANT=$VARIANT" >&2; exit 2
fi
case "$CROSS_ATTN_QUERY" in
    own|self_attn) ;;
    *) echo "error: CROSS_ATTN_QUERY=$CROSS_ATTN_QUERY: use own (a query projection of its own) or self_attn (the published layer's)" >&2; exit 2 ;;
esac
case "$SLOW_POOLING" in
    1|2) ;;
    *) echo "error: SLOW_POOLING=$SLOW_POOLING: use 1 (an 8 x 8 grid of slow tokens a frame) or 2 (4 x 4)" >&2; exit 2 ;;
esac
case "$VARIANT" in
    # 16 frames x 64 slow tokens (SLOW_POOLING=1: the tower's 8 x 8 grid) or x 16 (2: pooled 2 x 2) through
    # 4 hybrid layers (every layer); the fast tokens average every frame to 2 x 2 either way: 16 x 4 = 64
    # fast tokens in the LM. Each slow token also gets its frame's time and its cell's row and column
    # (SLOW_POSITIONS).
    slowfast) VARIANT_ARGS=(--mm_video_pooling_stride "$SLOW_POOLING" --fast_token_temporal_stride 1
                            --fast_token_spatial_stride $(( 4 / SLOW_POOLING ))
                            --slow_token_position_encoding "$SLOW_POSITIONS" --cross_attn_query_source "$CROSS_ATTN_QUERY") ;;
    # The same 64 fast tokens, no hybrid layers.
    fast) VARIANT_ARGS=(--mm_video_pooling_stride 2 --cross_attn_max_layer_depth 0 --fast_token_temporal_stride 1
                        --fast_token_spatial_stride 2) ;;
    # All 256 slow tokens (pooled 2 x 2) in the LM as ordinary tokens, no hybrid layers (the self-attention-only
    # baseline).
    slow) VARIANT_ARGS=(--mm_video_pooling_stride 2 --cross_attn_max_layer_depth 0 --fast_token_temporal_stride 1
                        --fast_token_spatial_stride 1) ;;
    *) echo "error: VARIANT=$VARIANT: use slowfast, fast or slow" >&2; exit 2 ;;
esac

log() { echo "[train_tiny $(date +%H:%M:%S)] $*" >&2; }
DATA="$WORK/data"

# 0. data
# The training split asks each video every question it answers (QUESTIONS=all) or a few (sampled), in a folder of
# its own per choice; val and test always ask a few, as the scores have since the first run.
# train_data_dir QUESTIONS FLASH_RATE: the folder of that training split.
train_data_dir() {
    local dir="$DATA"
    case "$1" in
        all) dir="$WORK/data-all-questions" ;;
        all_shape) dir="$WORK/data-all-shape-questions" ;;
        all_shape_flash) dir="$WORK/data-all-shape-flash-questions" ;;
    esac
    if [[ "$2" != 0.3 ]]; then dir="$dir-flash$2"; fi
    echo "$dir"
}
TRAIN_DATA="$(train_data_dir "$QUESTIONS" "$FLASH_RATE")"
SPLITS=("train $TRAIN_VIDEOS 0 $QUESTIONS $TRAIN_DATA $FLASH_RATE" "val $VAL_VIDEOS 1 sampled $DATA 0.3"
        "test $TEST_VIDEOS 2 sampled $DATA 0.3")
if (( REFINE_STEPS > 0 )); then
    REFINE_DATA="$(train_data_dir "$REFINE_QUESTIONS" "$REFINE_FLASH_RATE")"
    SPLITS+=("train $TRAIN_VIDEOS 0 $REFINE_QUESTIONS $REFINE_DATA $REFINE_FLASH_RATE")
fi
for spec in "${SPLITS[@]}"; do
    read -r split videos seed questions root flash_rate <<<"$spec"
    if [[ ! -f "$root/$split.json" ]]; then
        log "rendering the $split split ($videos videos, $questions questions, flash rate $flash_rate)"
        "$PYTHON" -m playground.synthetic_data --out "$root" --split "$split" --seed "$seed" --questions "$questions" \
            --flash-rate "$flash_rate" \
            --num-videos "$videos" --num-images 0 --num-text 0 --size "$SIZE" --frames "$FRAMES" --fps "$FPS" >/dev/null
    fi
done

# 1. tower
TOWER="$WORK/tower.safetensors"
if [[ ! -f "$TOWER" ]]; then
    log "pretraining the vision tower"
    "$PYTHON" -m playground.pretrain_tower --out "$TOWER" "${TOWER_ARGS[@]}" --steps "$TOWER_STEPS" --seed 0
fi

# 2. base language model and tokenizer
BASE="$WORK/base"
if [[ ! -f "$BASE/config.json" ]]; then
    log "initialising the language model"
    "$PYTHON" -m llava.model.tiny "$BASE" --base --hidden-size 128 --intermediate-size 256 --layers 4 \
        --heads 4 --kv-heads 2 --seed 0 >/dev/null
fi

# 3. supervised fine-tuning
# sft MODEL DATA_DIR OUTPUT_DIR STEPS: one stage of the recipe's fine-tuning. From the base LM it builds the
# Slow-Fast model; from a Slow-Fast checkpoint (3b) the checkpoint's architecture is kept and trained on.
sft() {
    local model="$1" data="$2" output="$3" steps="$4"
    source "$ROOT/scripts/launch_train.sh"
    (
        export MODEL="$model" DATA_PATH="$data/train.json" VIDEO_DIR="$data" OUTPUT_DIR="$output"
        export NPROC_PER_NODE OMP_NUM_THREADS="$THREADS"
        launch_train --version qwen_1_5 \
            --vision_tower convnext-576 --vision_tower_pretrained "$TOWER" --mm_vision_tower_overrides "$OVERRIDES" \
            --freeze_mm_vision_encoder True --mm_projector_type mlp2x_gelu --tune_mm_mlp_adapter False \
            --initialize_cross_attn_kv_from_lm True --cross_attn_every_n_layers 1 --cross_attn_implementation text-only-vanilla-flashattn \
            --cross_attn_gating_type whole-dynamic-tanh \
            --video_frames "$FRAMES" --fps 0 --min_fast_frames 4 "${VARIANT_ARGS[@]}" \
            --learning_rate 1e-3 --per_device_train_batch_size $(( GLOBAL_BATCH / NPROC_PER_NODE )) --gradient_accumulation_steps 1 \
            --max_steps "$steps" --lr_scheduler_type cosine --warmup_ratio 0.03 --weight_decay 0.0 \
            --max_grad_norm 1.0 --model_max_length 512 --seed "$SEED" --data_seed "$SEED" \
            --save_strategy no --logging_steps 50 --dataloader_num_workers 0 --lazy_preprocess True --report_to none ${EXTRA_TRAIN_ARGS:-}
    )
}
RUN="$WORK/sft-$VARIANT"
if [[ "$VARIANT" == slowfast && "$SLOW_POSITIONS" != none ]]; then RUN="$RUN-$SLOW_POSITIONS"; fi
if [[ "$VARIANT" == slowfast && "$SLOW_POOLING" != 2 ]]; then RUN="$RUN-pool$SLOW_POOLING"; fi
if [[ "$VARIANT" == slowfast && "$CROSS_ATTN_QUERY" != own ]]; then RUN="$RUN-query_$CROSS_ATTN_QUERY"; fi
if [[ "$QUESTIONS" != all ]]; then RUN="$RUN-questions_$QUESTIONS"; fi
if [[ "$FLASH_RATE" != 0.3 ]]; then RUN="$RUN-flash_rate$FLASH_RATE"; fi
if [[ "$SEED" != 0 ]]; then RUN="$RUN-seed$SEED"; fi
if [[ "$MAX_STEPS" != 3000 ]]; then RUN="$RUN-steps$MAX_STEPS"; fi
if [[ ! -f "$RUN/model.safetensors" ]]; then
    log "training ($VARIANT, slow-token positions ${SLOW_POSITIONS}, $QUESTIONS questions, $MAX_STEPS steps)"
    sft "$BASE" "$TRAIN_DATA" "$RUN" "$MAX_STEPS"
fi

# 3b. refining (REFINE_STEPS > 0): the same fine-tuning again from stage 3's weights (a fresh optimiser and
# schedule), on the REFINE_QUESTIONS training split: motion first, then which shape has each colour and more
# flashes (docs/tiny-model.md, "Motion first, then the rest").
if (( REFINE_STEPS > 0 )); then
    STAGE1="$RUN"
    RUN="$RUN-refine_${REFINE_QUESTIONS}-flash_rate${REFINE_FLASH_RATE}-steps$REFINE_STEPS"
    if [[ ! -f "$RUN/model.safetensors" ]]; then
        log "refining ($REFINE_QUESTIONS questions, flash rate $REFINE_FLASH_RATE, $REFINE_STEPS steps)"
        sft "$STAGE1" "$REFINE_DATA" "$RUN" "$REFINE_STEPS"
    fi
fi

# 4. export and test
if [[ ! -f "$OUT/config.json" ]]; then
    log "exporting fp16 weights to $OUT"
    "$PYTHON" -m llava.model.export "$RUN" "$OUT" --dtype float16
fi
if [[ ! -f "$OUT/eval_test.json" ]]; then
    log "scoring the test split"
    "$PYTHON" -m playground.evaluate_synthetic --model-path "$OUT" --data "$DATA" --split test --out "$OUT/eval_test.json"
fi
