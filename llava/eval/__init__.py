"""Evaluation: the lmms-eval model ``slowfast_videomllm`` (:mod:`llava.eval.lmms_eval_model`), registered
through the ``lmms_eval.models`` entry point (:mod:`llava.eval.lmms_eval_manifest`). Needs the ``eval`` extra."""
