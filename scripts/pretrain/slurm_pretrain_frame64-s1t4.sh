#!/usr/bin/env bash
#SBATCH --job-name=slowfast-pretrain
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
# Multi-node stage 1 under Slurm: one torchrun per node, rendezvous on the first node.
#   sbatch --nodes 4 scripts/pretrain/slurm_pretrain_frame64-s1t4.sh [extra trainer arguments]
# Same environment variables as scripts/pretrain/pretrain_frame64-s1t4.sh; set them before sbatch
# (Slurm passes the environment) or in this file.
set -euo pipefail
REPO="${SLURM_SUBMIT_DIR:-$(pwd)}"
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MASTER_PORT="${MASTER_PORT:-29500}"
export NNODES="${SLURM_NNODES:-1}"
export NPROC_PER_NODE="${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
srun --kill-on-bad-exit=1 bash -c \
    'NODE_RANK=$SLURM_NODEID exec bash "$0"/scripts/pretrain/pretrain_frame64-s1t4.sh "${@}"' "$REPO" "$@"
