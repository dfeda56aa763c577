#!/usr/bin/env bash
# Video-MME without subtitles (lmms-eval task videomme; needs a Hugging Face token for the dataset).
# Reported (64-frame / 96-frame checkpoint): 60.2 / 60.3, with PROTOCOL=reference
#   PROTOCOL=reference CKPT=shi-labs/slowfast-video-mllm-qwen2-7b-convnext-576-frame96-s1t6 scripts/eval/videomme.sh
exec "$(dirname "${BASH_SOURCE[0]}")/run_lmms_eval.sh" videomme "$@"
