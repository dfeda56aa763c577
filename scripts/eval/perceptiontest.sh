#!/usr/bin/env bash
# Perception Test validation set, multiple choice (lmms-eval task perceptiontest_val_mc).
# Reported (64-frame / 96-frame checkpoint): 70.3 / 70.2, with PROTOCOL=reference
#   PROTOCOL=reference CKPT=shi-labs/slowfast-video-mllm-qwen2-7b-convnext-576-frame96-s1t6 scripts/eval/perceptiontest.sh
exec "$(dirname "${BASH_SOURCE[0]}")/run_lmms_eval.sh" perceptiontest_val_mc "$@"
