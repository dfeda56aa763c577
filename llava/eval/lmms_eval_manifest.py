"""Entry point of group ``lmms_eval.models``: tells lmms-eval where the ``slowfast_videomllm`` class lives.

The class is imported only when a run asks for this model, so listing lmms-eval's models stays cheap.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(
    model_id="slowfast_videomllm",
    simple_class_path="llava.eval.lmms_eval_model.SlowFastVideoMLLM",
)
