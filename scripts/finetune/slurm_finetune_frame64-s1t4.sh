#!/usr/bin/env bash
#SBATCH --job-name=slowfast-finetune
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
# Multi-node stage 2 (SFT) under Slurm: one torchrun per node, rendezvous on the first node.
#   sbatch --nodes 4 scripts/finetune/slurm_finetune_frame64-s1t4.sh [extra trainer arguments]
# Same environment variables as scripts/finetune/finetune_frame64-s1t4.sh; set them before sbatch
# (Slurm passes the environment) or in this file.
# Five minutes before the time limit Slurm sends SIGUSR1 to this script (B:), which forwards it to the training
# processes: they finish their step, save a complete checkpoint and stop, and the job requeues itself
# (--requeue, scontrol requeue); the next run resumes from that checkpoint. Preemption (SIGTERM, sent to every
# process of the step: DataLoader workers ignore it, the trainers stop) does the same within the cluster's grace
# time; a step killed after the signal is requeued too. MAX_RESTARTS_WITHOUT_PROGRESS [3]: requeues in a row
# allowed without a new complete checkpoint. Logs of every restart go to the same file (--open-mode=append).
set -euo pipefail
REPO="${SLURM_SUBMIT_DIR:-$(pwd)}"
source "$REPO/scripts/launch_train.sh"
export OUTPUT_DIR="${OUTPUT_DIR:-checkpoints/slowfast-qwen2-7b-frame64-s1t4}"  # the recipe's default; the job reads its run_status.json
slurm_train "$REPO/scripts/finetune/finetune_frame64-s1t4.sh" "$@"
