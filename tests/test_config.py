"""Configuration validation: bad fields fail at load time with their name in the message."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

import llava.model  # noqa: F401
from llava.model import LlavaQwenSlowFastConfig

from conftest import tiny_config


def test_released_defaults():
    config = LlavaQwenSlowFastConfig(num_hidden_layers=28)
    assert config.hybrid_layer_indices == [0, 8, 16, 24]
    assert (config.fast_token_temporal_stride, config.min_fast_frames, config.mm_video_pooling_stride) == (4, 16, 2)
    assert config.cross_attn_decode_mode == "attend"


@pytest.mark.parametrize(
    "field, value",
    [
        ("mm_projector_type", "mlp3x_relu"),
        ("mm_vision_tower", "siglip-so400m"),
        ("fast_token_temporal_stride", 0),
        ("min_fast_frames", 0),
        ("cross_attn_every_n_layers", 0),
        ("cross_attn_decode_mode", "never"),
        ("mm_vision_chunk_frames", 0),
        ("tokenizer_padding_side", "middle"),
        ("mm_training_video_frames", 0),
        ("tokenizer_model_max_length", 0),
    ],
)
def test_bad_field_is_refused_with_its_name(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_unknown_tower_override_key_is_refused():
    with pytest.raises(ValueError, match="mm_vision_tower_overrides"):
        tiny_config(mm_vision_tower_overrides={"depth": [1, 1, 1, 1]})


def test_tower_image_size_must_be_divisible_by_32():
    with pytest.raises(ValueError, match="image_size"):
        tiny_config(mm_vision_tower_overrides={"image_size": 100})


def test_tower_output_stride_must_be_8_16_or_32():
    with pytest.raises(ValueError, match="output_stride"):
        tiny_config(mm_vision_tower_overrides={"output_stride": 4})


def test_wrongly_typed_field_in_config_json_fails_at_load(fixture_dir, tmp_path):
    config = json.loads((fixture_dir / "checkpoint" / "config.json").read_text())
    config["fast_token_temporal_stride"] = "four"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="fast_token_temporal_stride"):
        AutoConfig.from_pretrained(str(tmp_path))


def test_mm_hidden_size_must_match_the_tower(tmp_path):
    from llava.model import LlavaQwenSlowFastForCausalLM

    with pytest.raises(ValueError, match="mm_hidden_size"):
        LlavaQwenSlowFastForCausalLM(tiny_config(mm_hidden_size=100))


def test_released_shape_builds_on_meta_device_with_8_5b_parameters():
    from llava.model import LlavaQwenSlowFastForCausalLM

    config = LlavaQwenSlowFastConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
    )
    with torch.device("meta"):
        model = LlavaQwenSlowFastForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    assert 8.4e9 < total < 8.7e9
    assert [i for i, layer in enumerate(model.model.layers) if hasattr(layer.self_attn, "cross_attn_kv_proj")] == [0, 8, 16, 24]
    assert model.model.layers[0].self_attn.cross_attn_kv_proj.weight.shape == (2 * 4 * 128, 3584)
    assert model.get_vision_tower().num_patches_per_side == 18 and config.mm_hidden_size == 3072


def test_trained_frame_count_reads_the_reference_trainers_field_after_ours(fixture_dir, tmp_path):
    config = json.loads((fixture_dir / "checkpoint" / "config.json").read_text())
    config["mm_training_video_frames"] = 96  # what the reference's trainer writes; the fixture has no video_frames
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoConfig.from_pretrained(str(tmp_path))
    assert loaded.trained_video_frames == 96
    loaded.video_frames = 64
    assert loaded.trained_video_frames == 64
    assert tiny_config().trained_video_frames is None
