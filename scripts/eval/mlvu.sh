#!/usr/bin/env bash
# MLVU, dev set multiple choice (lmms-eval task mlvu_dev).
# Reported (64-frame / 96-frame checkpoint): 67.3 / 68.1, with PROTOCOL=reference
#   PROTOCOL=reference CKPT=shi-labs/slowfast-video-mllm-qwen2-7b-convnext-576-frame96-s1t6 scripts/eval/mlvu.sh
exec "$(dirname "${BASH_SOURCE[0]}")/run_lmms_eval.sh" mlvu_dev "$@"
