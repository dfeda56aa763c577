"""``load_pretrained_model``: the LLaVA entry point, for released checkpoints, hub ids and local folders."""

from __future__ import annotations

import json
import logging
import os
import warnings

import torch
from transformers import AutoTokenizer

from .configuration_llava_qwen_slow_fast import LlavaQwenSlowFastConfig
from .modeling_llava_qwen_slow_fast import LlavaQwenSlowFastForCausalLM

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or not a Slow-Fast model."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None: CUDA when available, else CPU. ``"cuda"`` without CUDA falls back to CPU with a warning."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("CUDA is not available: running on CPU", stacklevel=3)
        return torch.device("cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None/"auto": bfloat16 on CUDA (float16 where bf16 is unsupported), float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype={dtype!r}: use one of {sorted(names)} or 'auto'")
    return names[dtype]


def resolve_attn_implementation(requested: str | None, use_flash_attn: bool, device: torch.device) -> str:
    """flash-attn when asked for and usable (CUDA and the package installed), else SDPA."""
    want_flash = use_flash_attn or requested == "flash_attention_2"
    if want_flash:
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            warnings.warn("flash-attn is not installed: using PyTorch SDPA", stacklevel=3)
            return "sdpa"
        if device.type != "cuda":
            warnings.warn("flash-attn needs CUDA: using PyTorch SDPA", stacklevel=3)
            return "sdpa"
        return "flash_attention_2"
    return requested or "sdpa"


def _check_local_checkpoint(model_path: str) -> None:
    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"checkpoint '{model_path}' has no config.json")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint '{model_path}': config.json is not valid JSON ({err})") from None
    model_type = config.get("model_type")
    if model_type != LlavaQwenSlowFastConfig.model_type:
        raise CheckpointError(
            f"checkpoint '{model_path}' has model_type={model_type!r}; expected "
            f"'{LlavaQwenSlowFastConfig.model_type}' (a Slow-Fast video LLM checkpoint)"
        )


def load_pretrained_model(
    model_path: str,
    model_base: str | None = None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: str | dict | None = "auto",
    device: str | torch.device = "cuda",
    use_flash_attn: bool = False,
    torch_dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    cross_attn_decode_mode: str | None = None,
    **kwargs,
):
    """Load a Slow-Fast checkpoint (local folder or hub id).

    Returns ``(tokenizer, model, image_processor, context_len)`` as LLaVA does. ``device="cuda"`` falls back
    to CPU when CUDA is absent; the dtype defaults to bf16 on CUDA and fp32 on CPU. ``model_base`` is the
    base model of a LoRA checkpoint (a folder with ``adapter_config.json``), merged on load.
    ``cross_attn_decode_mode`` overrides the config (``"attend"`` or ``"reference"``).
    """
    kwargs.pop("trust_remote_code", None)  # not needed: the architecture is registered on import
    multimodal = kwargs.pop("multimodal", True)  # noqa: F841 - accepted for LLaVA call compatibility
    model_path = os.path.expanduser(str(model_path))
    is_local = os.path.isdir(model_path)
    if not is_local and (os.path.exists(model_path) or model_path.startswith((".", "/", "~"))):
        raise CheckpointError(f"checkpoint '{model_path}' is not a directory")
    adapter = is_local and os.path.isfile(os.path.join(model_path, "adapter_config.json"))
    if is_local and not adapter:
        _check_local_checkpoint(model_path)

    dev = resolve_device(device)
    dtype = resolve_dtype(torch_dtype if torch_dtype is not None else kwargs.pop("dtype", None), dev)
    attn = resolve_attn_implementation(attn_implementation, use_flash_attn, dev)
    load_kwargs = dict(dtype=dtype, attn_implementation=attn, **kwargs)
    if load_8bit or load_4bit:
        from transformers import BitsAndBytesConfig

        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=load_8bit, load_in_4bit=load_4bit, bnb_4bit_compute_dtype=dtype
        )
    if dev.type == "cuda":
        load_kwargs["device_map"] = device_map if (device_map is not None and str(device) == "cuda") else {"": dev}

    try:
        if adapter:
            model = _load_lora(model_path, model_base, load_kwargs)
        else:
            model = LlavaQwenSlowFastForCausalLM.from_pretrained(model_path, **load_kwargs)
    except (OSError, RuntimeError, KeyError) as err:
        raise CheckpointError(f"could not load checkpoint '{model_path}': {err}") from err
    if dev.type != "cuda":
        model.to(dev)
    if cross_attn_decode_mode is not None:
        if cross_attn_decode_mode not in ("attend", "reference"):
            raise ValueError(f"cross_attn_decode_mode={cross_attn_decode_mode!r}: use 'attend' or 'reference'")
        model.config.cross_attn_decode_mode = cross_attn_decode_mode
    model.eval()

    tokenizer_path = model_path if not adapter or os.path.isfile(os.path.join(model_path, "tokenizer_config.json")) else model_base
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    tower = model.get_vision_tower()
    image_processor = tower.image_processor if tower is not None else None
    context_len = model.config.tokenizer_model_max_length or model.config.max_position_embeddings
    return tokenizer, model, image_processor, context_len


def _load_lora(model_path: str, model_base: str | None, load_kwargs: dict) -> LlavaQwenSlowFastForCausalLM:
    if model_base is None:
        raise CheckpointError(f"'{model_path}' is a LoRA adapter: pass its base checkpoint as model_base")
    from peft import PeftModel

    base = LlavaQwenSlowFastForCausalLM.from_pretrained(model_base, **load_kwargs)
    non_lora = os.path.join(model_path, "non_lora_trainables.bin")
    if os.path.isfile(non_lora):
        state = torch.load(non_lora, map_location="cpu", weights_only=True)
        state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
        base.load_state_dict(state, strict=False)
    return PeftModel.from_pretrained(base, model_path).merge_and_unload()
