#!/usr/bin/env bash
# NExT-QA test set, multiple choice (lmms-eval task nextqa_mc_test).
# Reported (64-frame / 96-frame checkpoint): 83.5 / 83.1, with PROTOCOL=reference
#   PROTOCOL=reference CKPT=shi-labs/slowfast-video-mllm-qwen2-7b-convnext-576-frame96-s1t6 scripts/eval/nextqa.sh
exec "$(dirname "${BASH_SOURCE[0]}")/run_lmms_eval.sh" nextqa_mc_test "$@"
