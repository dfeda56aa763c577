#!/usr/bin/env bash
# MVBench, the 20-subtask group (lmms-eval group mvbench).
# Reported (64-frame / 96-frame checkpoint): 68.9 / 68.6, with PROTOCOL=reference
#   PROTOCOL=reference CKPT=shi-labs/slowfast-video-mllm-qwen2-7b-convnext-576-frame96-s1t6 scripts/eval/mvbench.sh
exec "$(dirname "${BASH_SOURCE[0]}")/run_lmms_eval.sh" mvbench "$@"
