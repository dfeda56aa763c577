"""The slow/fast split of one sample's projected visual features.

Slow tokens: every (video-pooled) token of every frame, read by the hybrid layers through cross-attention.
Fast tokens: the same features further sampled and pooled in time and space, read by the language model as
ordinary tokens in place of ``<image>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SlowFastParams:
    """Pooling settings, named as in the config."""

    video_pooling_stride: int = 2
    temporal_sampling_stride: int = 1
    temporal_stride: int = 4
    spatial_stride: int = 1
    min_fast_frames: int = 16

    @classmethod
    def from_config(cls, config) -> "SlowFastParams":
        return cls(
            video_pooling_stride=config.mm_video_pooling_stride,
            temporal_sampling_stride=config.fast_token_temporal_sampling_stride,
            temporal_stride=config.fast_token_temporal_stride,
            spatial_stride=config.fast_token_spatial_stride,
            min_fast_frames=config.min_fast_frames,
        )


@dataclass
class SlowFastTokens:
    """One sample's visual tokens: ``fast`` ``[F, C]`` and ``slow`` ``[S, C]``."""

    fast: torch.Tensor
    slow: torch.Tensor


def spatial_avg_pool(grid: torch.Tensor, stride: int) -> torch.Tensor:
    """Average-pool ``[T, h, w, C]`` by ``stride`` in both spatial axes (remainder dropped)."""
    if stride == 1:
        return grid
    pooled = F.avg_pool2d(grid.permute(0, 3, 1, 2), kernel_size=stride, stride=stride)
    return pooled.permute(0, 2, 3, 1)


def temporal_sample_indices(num_frames: int, sampling_stride: int, min_fast_frames: int) -> list[int]:
    """Frames kept for the fast path: ``min(int(i*T/k), T-1)`` for ``i < k``, ``k = max(T // s, min_fast)``.

    All frames are kept when ``s == 1`` or when there are fewer than ``min_fast_frames``.
    """
    if sampling_stride <= 1 or num_frames < min_fast_frames:
        return list(range(num_frames))
    k = max(num_frames // sampling_stride, min_fast_frames)
    return [min(int(i * num_frames / k), num_frames - 1) for i in range(k)]


def temporal_avg_pool(grid: torch.Tensor, stride: int, min_fast_frames: int) -> torch.Tensor:
    """Pool ``[T, h, w, C]`` in time.

    Non-overlapping means over groups of ``stride`` frames (a remainder is dropped) when that leaves at
    least ``min_fast_frames`` frames; otherwise adaptive average pooling to ``min(T, min_fast_frames)``.
    """
    frames = grid.shape[0]
    if frames // stride >= min_fast_frames:
        kept = (frames // stride) * stride
        return grid[:kept].unflatten(0, (frames // stride, stride)).mean(dim=1)
    target = min(frames, min_fast_frames)
    if target == frames:
        return grid
    flat = grid.flatten(1).transpose(0, 1).unsqueeze(0)  # [1, h*w*C, T]
    pooled = F.adaptive_avg_pool1d(flat, target)
    return pooled.squeeze(0).transpose(0, 1).reshape(target, *grid.shape[1:])


def split_slow_fast(features: torch.Tensor, params: SlowFastParams) -> SlowFastTokens:
    """Split one sample's projected features ``[T, N, C]`` (``N = g*g`` tokens per frame).

    Video (``T > 1``): each frame is first average-pooled by ``video_pooling_stride``; slow tokens are all
    pooled frames flattened (``T * g'^2``); fast tokens are temporally sampled, temporally pooled, then
    spatially pooled. A single image (``T == 1``) is not video-pooled: its slow tokens are all ``N`` tokens,
    its fast tokens are only spatially pooled.
    """
    frames, num_tokens, width = features.shape
    side = int(round(num_tokens**0.5))
    if side * side != num_tokens:
        raise ValueError(f"expected a square grid of vision tokens per frame, got {num_tokens}")
    grid = features.reshape(frames, side, side, width)
    if frames == 1:
        return SlowFastTokens(
            fast=spatial_avg_pool(grid, params.spatial_stride).reshape(-1, width), slow=grid.reshape(-1, width)
        )
    grid = spatial_avg_pool(grid, params.video_pooling_stride)
    slow = grid.reshape(-1, width)
    fast = grid[temporal_sample_indices(frames, params.temporal_sampling_stride, params.min_fast_frames)]
    fast = temporal_avg_pool(fast, params.temporal_stride, params.min_fast_frames)
    fast = spatial_avg_pool(fast, params.spatial_stride)
    return SlowFastTokens(fast=fast.reshape(-1, width), slow=slow)


def count_visual_tokens(num_frames: int, grid_size: int, params: SlowFastParams) -> tuple[int, int]:
    """``(fast, slow)`` token counts for a sample of ``num_frames`` frames with a ``grid_size``^2 grid."""
    dummy = torch.zeros(num_frames, grid_size * grid_size, 1)
    tokens = split_slow_fast(dummy, params)
    return tokens.fast.shape[0], tokens.slow.shape[0]
