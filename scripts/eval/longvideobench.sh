#!/usr/bin/env bash
# LongVideoBench validation set, video only (lmms-eval task longvideobench_val_v).
# Reported (64-frame / 96-frame checkpoint): 56.6 / 58.0, with PROTOCOL=reference
#   PROTOCOL=reference CKPT=shi-labs/slowfast-video-mllm-qwen2-7b-convnext-576-frame96-s1t6 scripts/eval/longvideobench.sh
exec "$(dirname "${BASH_SOURCE[0]}")/run_lmms_eval.sh" longvideobench_val_v "$@"
