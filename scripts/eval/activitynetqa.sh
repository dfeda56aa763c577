#!/usr/bin/env bash
# ActivityNet-QA (lmms-eval task activitynetqa). Answers are judged by GPT: set OPENAI_API_KEY (and MODEL_VERSION for the judge model).
# Reported (64-frame / 96-frame checkpoint): 54.8 / 54.5, with PROTOCOL=reference
#   PROTOCOL=reference CKPT=shi-labs/slowfast-video-mllm-qwen2-7b-convnext-576-frame96-s1t6 scripts/eval/activitynetqa.sh
exec "$(dirname "${BASH_SOURCE[0]}")/run_lmms_eval.sh" activitynetqa "$@"
