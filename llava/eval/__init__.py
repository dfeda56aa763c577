"""Evaluation with the released lmms-eval (needs the ``eval`` extra).

- ``lmms_eval_model``: the lmms-eval model ``slowfast_videomllm`` (requests, batching, video cache, likelihoods);
- ``protocol``: the evaluation protocols (``default``, ``reference``) and per-request generation settings;
- ``lmms_eval_manifest``: what the ``lmms_eval.models`` entry point registers;
- ``checked_run``: runs an lmms-eval command and fails when lmms-eval reports an error with exit status 0.
"""
