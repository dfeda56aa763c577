#!/usr/bin/env bash
# TempCompass, multiple-choice format (lmms-eval task tempcompass_multi_choice).
# Reported (64-frame / 96-frame checkpoint): 68.9 / 67.7, with PROTOCOL=reference
#   PROTOCOL=reference CKPT=shi-labs/slowfast-video-mllm-qwen2-7b-convnext-576-frame96-s1t6 scripts/eval/tempcompass.sh
exec "$(dirname "${BASH_SOURCE[0]}")/run_lmms_eval.sh" tempcompass_multi_choice "$@"
