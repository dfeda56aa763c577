"""The Slow-Fast model; importing this package registers it with transformers' Auto classes.

- ``configuration_llava_qwen_slow_fast``: the config, with the reference's field names, validated at load;
- ``modeling_llava_qwen_slow_fast``: the model (vision path, merging fast tokens into the text, forward, generate);
- ``slow_fast``: the slow/fast split and the slow-token position encoding;
- ``hybrid_layer``: the hybrid decoder layer and its gated cross-attention;
- ``cache``: the generation caches that keep each hybrid layer's slow keys/values;
- ``packing``: packed training rows (positions restarting per sample, each sample's slow-token segment);
- ``compat``: what differs between supported transformers releases (the cache argument's name);
- ``vision_tower``: timm's ConvNeXt as the tower; ``projector``: the projector;
- ``builder``: ``load_pretrained_model``; ``tokenizer_utils``: a tiny offline Qwen2-compatible tokenizer;
- ``tiny``: tiny random checkpoints; ``export``: fp16 export of a trained checkpoint.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import SlowFastCache, SlowFastStaticCache
from .configuration_llava_qwen_slow_fast import LlavaQwenSlowFastConfig
from .modeling_llava_qwen_slow_fast import (
    LlavaQwenSlowFastForCausalLM,
    LlavaQwenSlowFastModel,
    MultimodalInputs,
)
from .slow_fast import SlowFastParams, SlowFastTokens, split_slow_fast

AutoConfig.register(LlavaQwenSlowFastConfig.model_type, LlavaQwenSlowFastConfig, exist_ok=True)
AutoModel.register(LlavaQwenSlowFastConfig, LlavaQwenSlowFastModel, exist_ok=True)
AutoModelForCausalLM.register(LlavaQwenSlowFastConfig, LlavaQwenSlowFastForCausalLM, exist_ok=True)

__all__ = [
    "LlavaQwenSlowFastConfig",
    "LlavaQwenSlowFastForCausalLM",
    "LlavaQwenSlowFastModel",
    "MultimodalInputs",
    "SlowFastCache",
    "SlowFastStaticCache",
    "SlowFastParams",
    "SlowFastTokens",
    "split_slow_fast",
]
