"""Write small random checkpoints, offline: a Slow-Fast model, or (``--base``) a plain Qwen2 causal LM.

    python -m llava.model.tiny DIR [--base] [--frames 8] [--image-size 64] [--hidden-size 64] ...

The folder holds ``config.json``, ``model.safetensors``, a tokenizer trained locally with the Qwen2 special
tokens, ``generation_config.json`` and (Slow-Fast only) ``preprocessor_config.json``: everything that
``load_pretrained_model``, the CLI and the trainer read.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from .configuration_llava_qwen_slow_fast import LlavaQwenSlowFastConfig
from .modeling_llava_qwen_slow_fast import LlavaQwenSlowFastForCausalLM
from .tokenizer_utils import IM_END_TOKEN, PAD_TOKEN, train_tiny_tokenizer


@dataclass
class TinySpec:
    """Sizes of a tiny model. Vision: ConvNeXt ``vision_depths``/``vision_dims`` at ``image_size`` px."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    image_size: int = 64
    vision_depths: list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    vision_dims: list[int] = field(default_factory=lambda: [16, 24, 32, 48])
    vision_output_stride: int = 32
    frames: int = 8
    cross_attn_every_n_layers: int = 2
    cross_attn_implementation: str = "text-only-vanilla-flashattn"
    cross_attn_gating_type: str = "whole-dynamic-tanh-warmup"
    video_pooling_stride: int = 2
    temporal_stride: int = 4
    spatial_stride: int = 1
    temporal_sampling_stride: int = 1
    min_fast_frames: int = 1
    warm_up_gate: float = 0.5
    dtype: str = "float32"
    seed: int = 0


def _qwen2_fields(spec: TinySpec, tokenizer) -> dict:
    return dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END_TOKEN),
        bos_token_id=None,
    )


def _tower_overrides(spec: TinySpec) -> dict:
    overrides = {"depths": spec.vision_depths, "dims": spec.vision_dims, "image_size": spec.image_size}
    if spec.vision_output_stride != 32:
        overrides["output_stride"] = spec.vision_output_stride
    return overrides


def slow_fast_config(spec: TinySpec, tokenizer) -> LlavaQwenSlowFastConfig:
    return LlavaQwenSlowFastConfig(
        **_qwen2_fields(spec, tokenizer),
        mm_vision_tower="convnext-576",
        mm_vision_tower_overrides=_tower_overrides(spec),
        mm_projector_type="mlp2x_gelu",
        video_frames=spec.frames,
        mm_video_pooling_stride=spec.video_pooling_stride,
        fast_token_temporal_stride=spec.temporal_stride,
        fast_token_spatial_stride=spec.spatial_stride,
        fast_token_temporal_sampling_stride=spec.temporal_sampling_stride,
        min_fast_frames=spec.min_fast_frames,
        cross_attn_every_n_layers=spec.cross_attn_every_n_layers,
        cross_attn_max_layer_depth=spec.num_layers,
        cross_attn_implementation=spec.cross_attn_implementation,
        cross_attn_gating_type=spec.cross_attn_gating_type,
        tokenizer_model_max_length=spec.max_position_embeddings,
        architectures=["LlavaQwenSlowFastForCausalLM"],
    )


def write_tiny_checkpoint(out_dir: str, spec: TinySpec | None = None, base: bool = False) -> str:
    """Write a random tiny checkpoint to ``out_dir`` and return the path."""
    spec = spec or TinySpec()
    tokenizer = train_tiny_tokenizer(vocab_size=spec.vocab_size, model_max_length=spec.max_position_embeddings)
    spec.vocab_size = len(tokenizer)
    torch.manual_seed(spec.seed)
    if base:
        config = Qwen2Config(**_qwen2_fields(spec, tokenizer), architectures=["Qwen2ForCausalLM"])
        model = Qwen2ForCausalLM(config)
    else:
        model = LlavaQwenSlowFastForCausalLM(slow_fast_config(spec, tokenizer))
        with torch.no_grad():
            for layer in model.hybrid_layers:
                gate = layer.self_attn.cross_attn_warm_up_gate
                if gate is not None:  # a zero gate would hide the slow path entirely
                    gate.fill_(spec.warm_up_gate)
    model.to(getattr(torch, spec.dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=model.config.eos_token_id,
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        do_sample=False,
        max_new_tokens=64,
    )
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if not base:
        model.get_vision_tower().image_processor.save_pretrained(out_dir)
    return out_dir


def write_tower_file(path: str, spec: TinySpec) -> str:
    """Random ConvNeXt tower weights in timm's layout (what ``--vision_tower_pretrained`` reads)."""
    from safetensors.torch import save_file
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(spec.seed + 1)
    tower = ConvNeXt(depths=spec.vision_depths, dims=spec.vision_dims, num_classes=0, norm_eps=1e-5)
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, path)
    return path


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    defaults = TinySpec()
    parser = argparse.ArgumentParser(prog="python -m llava.model.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--base", action="store_true", help="write a plain Qwen2 causal LM (training's starting point)")
    parser.add_argument(
        "--vision-tower-file", help="also write random ConvNeXt weights (timm layout) to this .safetensors file"
    )
    parser.add_argument("--frames", type=int, default=defaults.frames, help="frames per video (config video_frames)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--vision-depths", type=_int_list, default=defaults.vision_depths)
    parser.add_argument("--vision-dims", type=_int_list, default=defaults.vision_dims)
    parser.add_argument(
        "--vision-output-stride", type=int, default=defaults.vision_output_stride, choices=[8, 16, 32],
        help="ConvNeXt output stride: 16 or 8 give a finer feature grid at small image sizes",
    )
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--intermediate-size", type=int, default=defaults.intermediate_size)
    parser.add_argument("--layers", type=int, default=defaults.num_layers)
    parser.add_argument("--heads", type=int, default=defaults.num_heads)
    parser.add_argument("--kv-heads", type=int, default=defaults.num_kv_heads)
    parser.add_argument(
        "--rope-theta", type=float, default=defaults.rope_theta,
        help="rotary base; Qwen2's released models use 1e6, which rotates the low-frequency query dimensions slowly",
    )
    parser.add_argument("--cross-attn-every", type=int, default=defaults.cross_attn_every_n_layers)
    parser.add_argument("--cross-attn-implementation", default=defaults.cross_attn_implementation)
    parser.add_argument("--cross-attn-gating-type", default=defaults.cross_attn_gating_type)
    parser.add_argument("--temporal-stride", type=int, default=defaults.temporal_stride)
    parser.add_argument("--spatial-stride", type=int, default=defaults.spatial_stride)
    parser.add_argument("--temporal-sampling-stride", type=int, default=defaults.temporal_sampling_stride)
    parser.add_argument("--min-fast-frames", type=int, default=defaults.min_fast_frames)
    parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    if not args.rope_theta > 0:
        parser.error(f"--rope-theta must be positive, got {args.rope_theta}")
    spec = TinySpec(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        rope_theta=args.rope_theta,
        image_size=args.image_size,
        vision_depths=args.vision_depths,
        vision_dims=args.vision_dims,
        vision_output_stride=args.vision_output_stride,
        frames=args.frames,
        cross_attn_every_n_layers=args.cross_attn_every,
        cross_attn_implementation=args.cross_attn_implementation,
        cross_attn_gating_type=args.cross_attn_gating_type,
        temporal_stride=args.temporal_stride,
        spatial_stride=args.spatial_stride,
        temporal_sampling_stride=args.temporal_sampling_stride,
        min_fast_frames=args.min_fast_frames,
        dtype=args.dtype,
        seed=args.seed,
    )
    try:
        path = write_tiny_checkpoint(args.out_dir, spec, base=args.base)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.vision_tower_file:
        write_tower_file(args.vision_tower_file, spec)
    kind = "Qwen2 base" if args.base else "Slow-Fast"
    print(f"wrote a tiny {kind} checkpoint to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
