"""The slow/fast split of one sample's projected features."""

from __future__ import annotations

import torch

from llava.model.slow_fast import (
    SlowFastParams,
    count_visual_tokens,
    split_slow_fast,
    temporal_avg_pool,
    temporal_sample_indices,
)

RELEASED = SlowFastParams(video_pooling_stride=2, temporal_sampling_stride=1, temporal_stride=4, spatial_stride=1, min_fast_frames=16)


def features(frames: int, side: int, width: int = 3) -> torch.Tensor:
    return torch.randn(frames, side * side, width, generator=torch.Generator().manual_seed(frames * 100 + side))


def test_released_64_frame_shapes():
    assert count_visual_tokens(64, 18, RELEASED) == (1296, 5184)


def test_released_96_frame_shapes_with_temporal_stride_6():
    params = SlowFastParams(temporal_stride=6, min_fast_frames=16)
    assert count_visual_tokens(96, 18, params) == (16 * 81, 96 * 81)


def test_slow_tokens_are_video_pooled_frames_in_order():
    x = features(3, 4)
    tokens = split_slow_fast(x, SlowFastParams(min_fast_frames=1))
    grid = x.reshape(3, 4, 4, 3)
    first = grid[0, :2, :2].mean(dim=(0, 1))
    last = grid[2, 2:, 2:].mean(dim=(0, 1))
    assert tokens.slow.shape == (3 * 4, 3)
    torch.testing.assert_close(tokens.slow[0], first)
    torch.testing.assert_close(tokens.slow[-1], last)


def test_temporal_pooling_averages_groups_and_drops_remainder():
    x = features(6, 4)
    tokens = split_slow_fast(x, SlowFastParams(temporal_stride=4, min_fast_frames=1))
    pooled = torch.nn.functional.avg_pool2d(x.reshape(6, 4, 4, 3).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    torch.testing.assert_close(tokens.fast, pooled[:4].mean(0).reshape(-1, 3))


def test_temporal_pooling_falls_back_to_adaptive_when_too_few_groups():
    grid = torch.arange(10, dtype=torch.float32).reshape(10, 1, 1, 1)
    pooled = temporal_avg_pool(grid, stride=4, min_fast_frames=4)  # 10 // 4 = 2 < 4 -> adaptive to 4
    expected = torch.nn.functional.adaptive_avg_pool1d(torch.arange(10.0)[None, None], 4).flatten()
    torch.testing.assert_close(pooled.flatten(), expected)


def test_min_fast_frames_above_available_frames_keeps_every_frame():
    x = features(5, 4)
    tokens = split_slow_fast(x, SlowFastParams(temporal_stride=4, min_fast_frames=16))
    assert tokens.fast.shape[0] == 5 * 4  # adaptive pooling to min(5, 16) = 5 frames is the identity
    torch.testing.assert_close(tokens.fast, tokens.slow)


def test_temporal_sampling_indices_follow_formula():
    assert temporal_sample_indices(64, 2, 16) == [min(int(i * 64 / 32), 63) for i in range(32)]
    assert temporal_sample_indices(20, 4, 8) == [min(int(i * 20 / 8), 19) for i in range(8)]  # k = max(5, 8)
    assert temporal_sample_indices(6, 4, 8) == list(range(6))  # fewer frames than min_fast_frames
    assert temporal_sample_indices(64, 1, 16) == list(range(64))


def test_128_frame_recipe_samples_then_pools_to_16_frames():
    params = SlowFastParams(temporal_sampling_stride=2, temporal_stride=4, min_fast_frames=16)
    fast, slow = count_visual_tokens(128, 18, params)
    assert (fast, slow) == (16 * 81, 128 * 81)


def test_spatial_stride_pools_fast_tokens_only():
    x = features(8, 8)
    tokens = split_slow_fast(x, SlowFastParams(temporal_stride=4, spatial_stride=2, min_fast_frames=1))
    assert tokens.slow.shape[0] == 8 * 16
    assert tokens.fast.shape[0] == 2 * 4


def test_single_image_is_not_video_pooled_and_only_spatially_pooled():
    x = features(1, 4)
    tokens = split_slow_fast(x, SlowFastParams(spatial_stride=2, min_fast_frames=16))
    torch.testing.assert_close(tokens.slow, x[0])
    pooled = torch.nn.functional.avg_pool2d(x.reshape(1, 4, 4, 3).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    torch.testing.assert_close(tokens.fast, pooled.reshape(-1, 3))


def test_visual_input_without_slow_tokens_merges_its_fast_tokens_only():
    from llava.model.slow_fast import SlowFastTokens

    from conftest import prompt_ids, tiny_model

    model = tiny_model()
    hidden = model.config.hidden_size
    tokens = SlowFastTokens(fast=torch.randn(5, hidden), slow=torch.zeros(0, hidden))
    mm = model.prepare_multimodal_inputs(prompt_ids(3, 4), visual_tokens=[tokens])
    assert mm.inputs_embeds.shape[1] == 3 + 5 + 4
    assert mm.slow_tokens is None
