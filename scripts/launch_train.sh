#!/usr/bin/env bash
# Shared launcher for the training recipes: `launch_train STAGE_ARGS... -- EXTRA_ARGS...`.
# Paths and launch settings come from the environment (defaults in brackets):
#   MODEL, DATA_PATH (annotations, or a mixture file: see docs/training.md "Data mixtures"), VIDEO_DIR, IMAGE_DIR [VIDEO_DIR],
#   OUTPUT_DIR, NPROC_PER_NODE [GPUs, or 2 on CPU],
#   NNODES [1], NODE_RANK [0], MASTER_ADDR [127.0.0.1], MASTER_PORT [29500], DEEPSPEED [the recipe's],
#   PYTHON [python3].
# Extra arguments go to the trainer after the recipe's, so they win.
# Without CUDA the same recipe runs on CPU: DeepSpeed over gloo, no bf16/tf32.
#
# Stopping and resuming: SIGUSR1 or SIGTERM, sent to this script alone, to its process group, to every process of
# the run (as Slurm does: torchrun, the trainers and their DataLoader workers included) or to one trainer, makes
# the trainers finish their current step, save one complete checkpoint and stop. This script passes a signal it
# receives on to the trainers once each has installed its handler: a signal that arrives while they start up
# (before torchrun has started them, or while they import) is delivered when they can take it. torchrun ignores
# both signals (it would kill the trainers 30 s after a SIGTERM); DataLoader workers ignore them too. SIGINT
# (Ctrl-C) still stops everything at once. Running the same command again resumes from the newest complete
# checkpoint.
# Exit status: 0 training finished; 75 stopped early with a complete checkpoint (a signal or --max_train_hours):
# run again to continue; 2 the trainer refused its arguments or data (its message is the last line); anything
# else: the trainer or torchrun failed.
set -euo pipefail
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LAUNCH_STOPPED_STATUS=75

# Whether process $1 catches signal $2 (a name), i.e. has installed its handler. Without /proc: assume it does.
_launch_catches() {
    local key value number
    [[ -r "/proc/$1/status" ]] || return 0
    number=$(kill -l "$2") || return 1
    while read -r key value; do
        if [[ "$key" == SigCgt: ]]; then
            (( (16#$value >> (number - 1)) & 1 ))
            return
        fi
    done < "/proc/$1/status" 2>/dev/null
    return 1
}

# Deliver the pending stop signal to each trainer (torchrun's children) that catches it and has not had it yet.
# It stays pending until every trainer in sight had it, and at least NPROC_PER_NODE of them did.
_launch_deliver() {
    local pid sent=0 waiting=0
    [[ -n "$_LAUNCH_PENDING" && -n "$_LAUNCH_AGENT_PID" ]] || return 0
    for pid in $(pgrep -P "$_LAUNCH_AGENT_PID" 2>/dev/null); do
        if [[ " $_LAUNCH_DELIVERED " == *" $pid "* ]]; then
            sent=$((sent + 1))
        elif _launch_catches "$pid" "$_LAUNCH_PENDING" && kill "-$_LAUNCH_PENDING" "$pid" 2>/dev/null; then
            _LAUNCH_DELIVERED+=" $pid"
            sent=$((sent + 1))
        else
            waiting=$((waiting + 1))
        fi
    done
    if (( sent > 0 && waiting == 0 && sent >= ${NPROC_PER_NODE:-1} )); then
        _LAUNCH_PENDING=""
    fi
}

_launch_stop_requested() {
    _LAUNCH_INTERRUPTED=1
    echo "launch_train: $1 received: the trainers finish their step, save a checkpoint and stop" >&2
    _LAUNCH_PENDING="$1"
    _LAUNCH_DELIVERED=""
    _launch_deliver
}

# Whether process $1 still runs (a child that exited stays a zombie until it is waited for).
_launch_running() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ -n "$state" && "$state" != Z* ]]
}

launch_train() {
    # From here on a stop signal is remembered, and delivered once the trainers can take it.
    _LAUNCH_AGENT_PID="" _LAUNCH_PENDING="" _LAUNCH_DELIVERED="" _LAUNCH_INTERRUPTED=0
    trap '_launch_stop_requested USR1' USR1
    trap '_launch_stop_requested TERM' TERM
    local recipe=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do recipe+=("$1"); shift; done
    [[ $# -gt 0 ]] && shift
    : "${MODEL:?set MODEL to the starting checkpoint}"
    : "${DATA_PATH:?set DATA_PATH to the annotation file (JSON or JSONL) or a mixture file (YAML or JSON)}"
    : "${OUTPUT_DIR:?set OUTPUT_DIR}"
    local video_dir="${VIDEO_DIR:-}" image_dir="${IMAGE_DIR:-${VIDEO_DIR:-}}"
    local device_args=()
    local python="${PYTHON:-python3}"
    local gpus=0
    # CUDA_VISIBLE_DEVICES set but empty hides every GPU: no need to ask torch. The probe ignores stop signals: one
    # sent to the whole process group must not kill it and leave the run on the CPU.
    if [[ "${CUDA_VISIBLE_DEVICES-unset}" != "" ]]; then
        gpus=$(trap '' TERM USR1; "$python" -c \
            'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null) \
            || gpus=0
    fi
    if [[ "$gpus" =~ ^[1-9][0-9]*$ ]]; then
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
    # torchrun ignores SIGTERM and SIGUSR1 (ignored in its subshell before exec; PET_SIGNALS_TO_HANDLE keeps it
    # from installing its own SIGTERM handler), and so do its trainers until they install their handlers. A
    # refusal that every trainer shares (bad arguments or data) is written to the refusal file and the trainers
    # exit 0, so that torchrun does not bury the message under a traceback; this script prints it last, exits 2.
    local refusal_file
    refusal_file=$(trap '' TERM USR1; mktemp "${TMPDIR:-/tmp}/launch_train.refusal.XXXXXX")
    (
        trap '' TERM USR1
        export PET_SIGNALS_TO_HANDLE="SIGINT,SIGHUP,SIGQUIT" LLAVA_LAUNCH_REFUSAL_FILE="$refusal_file"
        exec "$python" -m torch.distributed.run \
            --nproc_per_node "$NPROC_PER_NODE" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
            --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
            -m llava.train.train "${paths[@]}" "${recipe[@]}" "${device_args[@]}" "$@"
    ) &
    _LAUNCH_AGENT_PID=$!
    local status
    while :; do
        if [[ -n "$_LAUNCH_PENDING" ]]; then
            _launch_deliver
            if [[ -n "$_LAUNCH_PENDING" ]] && _launch_running "$_LAUNCH_AGENT_PID"; then
                sleep 0.2 || true  # not every trainer listens yet (a signal to the group may end the sleep)
                continue
            fi
        fi
        _LAUNCH_INTERRUPTED=0
        status=0
        wait "$_LAUNCH_AGENT_PID" || status=$?
        # a trapped signal interrupts `wait`; wait again for torchrun's own status
        (( _LAUNCH_INTERRUPTED )) || break
    done
    trap '' USR1 TERM  # the run is over: a late stop signal has nothing left to stop
    _LAUNCH_AGENT_PID=""
    local refusal=""
    if [[ -s "$refusal_file" ]]; then
        refusal=$(sed -n '2,$p' "$refusal_file")
    fi
    rm -f "$refusal_file"
    if [[ -n "$refusal" ]]; then
        echo "error: $refusal" >&2
        return 2
    fi
    if (( status == 0 )) && grep -qs '"status": "stopped"' "$OUTPUT_DIR/run_status.json"; then
        echo "launch_train: stopped early with a complete checkpoint in $OUTPUT_DIR;" \
            "run the same command again to resume (exit status $LAUNCH_STOPPED_STATUS)" >&2
        return "$LAUNCH_STOPPED_STATUS"
    fi
    return "$status"
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

# Under Slurm (sbatch): run RECIPE once per node, one torchrun each, rendezvous on the first node:
# `slurm_train RECIPE [TRAINER_ARGS...]`. A SIGUSR1 or SIGTERM reaching this batch shell (#SBATCH
# --signal=B:USR1@300, or preemption) is sent on to the job step with scancel. The job requeues itself (it needs
# #SBATCH --requeue) and resumes from the newest complete checkpoint when it starts again if the run stopped early
# with a checkpoint (status 75), or if it was signalled and the step then died (killed during its last save, say).
# With --kill-on-bad-exit, the first node to exit 75 may get the others killed as they exit, so the step's status
# can be a signal's: OUTPUT_DIR/run_status.json (removed before the step starts) then decides. A job is requeued
# at most MAX_RESTARTS_WITHOUT_PROGRESS [3] times in a row without a new complete checkpoint in OUTPUT_DIR: the
# next run that ends without one is not requeued (the count is kept in OUTPUT_DIR/slurm_restarts_without_progress).
_slurm_forward_stop() {
    _SLURM_INTERRUPTED=1
    _SLURM_SIGNALLED=1
    echo "slurm_train: $1 received: forwarding it to the training step" >&2
    scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null || { [[ -n "$_SLURM_STEP_PID" ]] \
        && kill "-$1" "$_SLURM_STEP_PID" 2>/dev/null; } || true
}

# The step of OUTPUT_DIR's newest complete checkpoint, -1 without one, nothing when it cannot be told.
_slurm_newest_step() {
    local step
    [[ -n "${OUTPUT_DIR:-}" ]] || return 0
    step=$("${PYTHON:-python3}" -m llava.train.checkpoints "$OUTPUT_DIR" 2>/dev/null) || return 0
    if [[ -z "$step" ]]; then echo -1; elif [[ "$step" =~ ^[0-9]+$ ]]; then echo "$step"; fi
}

slurm_train() {
    local recipe="$1"
    shift
    : "${SLURM_JOB_ID:?slurm_train runs inside a Slurm batch job (sbatch)}"
    _SLURM_STEP_PID="" _SLURM_SIGNALLED=0 _SLURM_INTERRUPTED=0
    trap '_slurm_forward_stop USR1' USR1
    trap '_slurm_forward_stop TERM' TERM
    export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
    export MASTER_PORT="${MASTER_PORT:-29500}"
    export NNODES="${SLURM_NNODES:-1}"
    export NPROC_PER_NODE="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
    echo "slurm_train: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}), $NNODES node(s), $recipe" >&2
    local run_status="${OUTPUT_DIR:+$OUTPUT_DIR/run_status.json}"
    local futile="${OUTPUT_DIR:+$OUTPUT_DIR/slurm_restarts_without_progress}"
    local most="${MAX_RESTARTS_WITHOUT_PROGRESS:-3}"
    if [[ ! "$most" =~ ^[0-9]+$ ]]; then
        echo "slurm_train: MAX_RESTARTS_WITHOUT_PROGRESS must be a whole number, got '$most'" >&2
        return 2
    fi
    [[ -n "$run_status" ]] && rm -f "$run_status"
    local before
    before=$(_slurm_newest_step)
    if [[ -z "$before" ]]; then
        echo "slurm_train: cannot read the checkpoints of OUTPUT_DIR (${OUTPUT_DIR:-unset}) with" \
            "${PYTHON:-python3} -m llava.train.checkpoints: restarts without progress are not capped" >&2
    fi
    srun --kill-on-bad-exit=1 bash -c 'NODE_RANK=$SLURM_NODEID exec bash "$0" "$@"' "$recipe" "$@" &
    _SLURM_STEP_PID=$!
    local status
    while :; do
        _SLURM_INTERRUPTED=0
        status=0
        wait "$_SLURM_STEP_PID" || status=$?
        (( _SLURM_INTERRUPTED )) || break
    done
    trap '' USR1 TERM  # the step is over: a late signal must not cut the requeue decision short
    if (( status != 0 && status != LAUNCH_STOPPED_STATUS )) && [[ -n "$run_status" ]] \
        && grep -qs '"status": "stopped"' "$run_status"; then
        echo "slurm_train: the step exited with $status, but the run had stopped with a complete checkpoint" >&2
        status=$LAUNCH_STOPPED_STATUS
    fi
    if (( status == 0 )); then
        [[ -n "$futile" ]] && rm -f "$futile"
        return 0
    fi
    if (( status != LAUNCH_STOPPED_STATUS && ! _SLURM_SIGNALLED )); then
        return "$status"  # a failure: requeueing would repeat it
    fi
    if (( status != LAUNCH_STOPPED_STATUS )); then
        echo "slurm_train: the step exited with $status after the job was signalled" >&2
    fi
    local after count=0
    after=$(_slurm_newest_step)
    if [[ -n "$before" && -n "$after" && -n "$futile" ]]; then
        if (( after > before )); then
            rm -f "$futile"
        else
            count=$(cat "$futile" 2>/dev/null || true)
            [[ "$count" =~ ^[0-9]+$ ]] || count=0
            count=$((count + 1))
            echo "$count" > "$futile"
            if (( count > most )); then
                echo "slurm_train: the last $count runs of job $SLURM_JOB_ID ended without a new complete" \
                    "checkpoint (the newest is still step $after): not requeueing it again" \
                    "(MAX_RESTARTS_WITHOUT_PROGRESS=$most); see the log above, then resubmit" >&2
                return "$status"
            fi
        fi
    fi
    echo "slurm_train: stopped early: requeueing job $SLURM_JOB_ID to resume from the newest complete checkpoint" >&2
    scontrol requeue "$SLURM_JOB_ID" || echo "slurm_train: scontrol requeue $SLURM_JOB_ID failed" >&2
    return "$status"
}
