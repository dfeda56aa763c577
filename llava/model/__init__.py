"""The Slow-Fast model; importing this package registers it with transformers' Auto classes."""

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
