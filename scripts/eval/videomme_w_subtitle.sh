#!/usr/bin/env bash
# Video-MME with subtitles (lmms-eval task videomme_w_subtitle).
# Reported (64-frame / 96-frame checkpoint): 63.0 / 63.4, with PROTOCOL=reference
#   PROTOCOL=reference CKPT=shi-labs/slowfast-video-mllm-qwen2-7b-convnext-576-frame96-s1t6 scripts/eval/videomme_w_subtitle.sh
exec "$(dirname "${BASH_SOURCE[0]}")/run_lmms_eval.sh" videomme_w_subtitle "$@"
