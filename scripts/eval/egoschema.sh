#!/usr/bin/env bash
# EgoSchema full set (lmms-eval task egoschema). Writes a submission file; the score comes from the EgoSchema server. egoschema_subset scores the 500-question subset locally.
# Reported (64-frame / 96-frame checkpoint): 59.2 / 59.8, with PROTOCOL=reference
#   PROTOCOL=reference CKPT=shi-labs/slowfast-video-mllm-qwen2-7b-convnext-576-frame96-s1t6 scripts/eval/egoschema.sh
exec "$(dirname "${BASH_SOURCE[0]}")/run_lmms_eval.sh" egoschema "$@"
