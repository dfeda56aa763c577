"""The slow/fast split of one sample's projected visual features.

Slow tokens: every (video-pooled) token of every frame, read by the hybrid layers through cross-attention.
Fast tokens: the same features further sampled and pooled in time and space, read by the language model as
ordinary tokens in place of ``<image>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_llava_qwen_slow_fast import SLOW_TOKEN_POSITION_ENCODINGS
# Sine and cosine of pi*k*x for k = 1..4, for each of time, row and column.
SLOW_POSITION_FREQUENCIES = 4


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
    """One sample's visual tokens: ``fast`` ``[F, C]`` and ``slow`` ``[S, C]``.

    ``slow_positions`` ``[S, 3]`` (float32; None when not computed): each slow token's frame time as a fraction
    of the clip (``i / (T - 1)``, 0 for the first sampled frame, 1 for the last; 0.5 for an image) and the
    centre of its cell in the (pooled) grid as fractions of the frame's height and width (``(r + 0.5) / side``).
    """

    fast: torch.Tensor
    slow: torch.Tensor
    slow_positions: torch.Tensor | None = None


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
            fast=spatial_avg_pool(grid, params.spatial_stride).reshape(-1, width),
            slow=grid.reshape(-1, width),
            slow_positions=slow_token_positions(1, side, device=features.device),
        )
    grid = spatial_avg_pool(grid, params.video_pooling_stride)
    slow = grid.reshape(-1, width)
    fast = grid[temporal_sample_indices(frames, params.temporal_sampling_stride, params.min_fast_frames)]
    fast = temporal_avg_pool(fast, params.temporal_stride, params.min_fast_frames)
    fast = spatial_avg_pool(fast, params.spatial_stride)
    positions = slow_token_positions(frames, grid.shape[1], device=features.device)
    return SlowFastTokens(fast=fast.reshape(-1, width), slow=slow, slow_positions=positions)


def slow_token_positions(num_frames: int, side: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[num_frames * side^2, 3]`` float32 ``(time, row, column)`` of slow tokens laid out frame by frame, row
    by row (the order of :func:`split_slow_fast`).

    Time is the frame's place in the clip, ``i / (T - 1)`` (frames are sampled evenly from the first to the last
    frame, so this does not depend on how many were sampled); a single frame gets 0.5. Row and column are cell
    centres as fractions of the frame, ``(r + 0.5) / side``, so an image's full grid and a video's pooled grid
    share one scale.
    """
    if num_frames < 1 or side < 1:
        raise ValueError(f"need at least one frame and a grid side of at least 1, got {num_frames} and {side}")
    time = torch.arange(num_frames, dtype=torch.float32, device=device) / (num_frames - 1) if num_frames > 1 else (
        torch.full((1,), 0.5, device=device)
    )
    cell = (torch.arange(side, dtype=torch.float32, device=device) + 0.5) / side
    t, r, c = torch.meshgrid(time, cell, cell, indexing="ij")
    return torch.stack([t, r, c], dim=-1).reshape(-1, 3)


def fourier_features(values: torch.Tensor, frequencies: int = SLOW_POSITION_FREQUENCIES) -> torch.Tensor:
    """``[..., 2 * frequencies]``: ``sin(pi k x)`` then ``cos(pi k x)`` for ``k = 1..frequencies`` of ``values``
    ``[...]`` in [0, 1]."""
    k = torch.arange(1, frequencies + 1, dtype=values.dtype, device=values.device)
    angles = math.pi * values[..., None] * k
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class SlowTokenPositionEncoding(nn.Module):
    """Where and when each slow token is, added to it before the hybrid layers read it.

    A fixed Fourier basis of the token's ``(time, row, column)`` (:func:`slow_token_positions`; ``2K`` features
    per axis, ``K = SLOW_POSITION_FREQUENCIES``) goes through a learned linear map ``weight`` ``[hidden,
    features]`` that starts at zero, so a model given this encoding computes exactly what it computed without
    it until training moves the map.

    ``kind``:
        ``"fourier"``: time, row and column features side by side (``6K``): a factorised embedding.
        ``"fourier_spacetime"``: those plus the products of every time feature with every row and every column
            feature (``6K + 8K^2``). Averaged over the tokens one query attends to (one object across frames),
            the products carry how its row and column change with time, i.e. its motion, which the factorised
            sum cannot express: its average only gives the object's mean time and mean place.
    """

    def __init__(self, kind: str, hidden_size: int, frequencies: int = SLOW_POSITION_FREQUENCIES) -> None:
        super().__init__()
        if kind not in SLOW_TOKEN_POSITION_ENCODINGS or kind == "none":
            raise ValueError(f"slow_token_position_encoding={kind!r}: use one of {list(SLOW_TOKEN_POSITION_ENCODINGS[1:])}")
        self.kind = kind
        self.frequencies = frequencies
        per_axis = 2 * frequencies
        self.num_features = 3 * per_axis + (2 * per_axis * per_axis if kind == "fourier_spacetime" else 0)
        self.weight = nn.Parameter(torch.zeros(hidden_size, self.num_features))

    def features(self, positions: torch.Tensor) -> torch.Tensor:
        """``positions`` ``[..., 3]`` -> basis ``[..., num_features]`` (float32)."""
        t, r, c = fourier_features(positions.float(), self.frequencies).unbind(-2)
        parts = [t, r, c]
        if self.kind == "fourier_spacetime":
            parts += [(t[..., :, None] * r[..., None, :]).flatten(-2), (t[..., :, None] * c[..., None, :]).flatten(-2)]
        return torch.cat(parts, dim=-1)

    def forward(self, slow: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``slow`` ``[S, hidden]`` plus the encoding of ``positions`` ``[S, 3]``, in ``slow``'s dtype."""
        if positions.shape != (slow.shape[0], 3):
            raise ValueError(f"expected positions [{slow.shape[0]}, 3] for {slow.shape[0]} slow tokens, got {tuple(positions.shape)}")
        encoding = self.features(positions.to(slow.device)).to(self.weight.dtype) @ self.weight.t()
        return slow + encoding.to(slow.dtype)


def count_visual_tokens(num_frames: int, grid_size: int, params: SlowFastParams) -> tuple[int, int]:
    """``(fast, slow)`` token counts for a sample of ``num_frames`` frames with a ``grid_size``^2 grid."""
    dummy = torch.zeros(num_frames, grid_size * grid_size, 1)
    tokens = split_slow_fast(dummy, params)
    return tokens.fast.shape[0], tokens.slow.shape[0]


def match_images_to_tokens(images, num_image_tokens: int):
    """A single ``[N, 3, H, W]`` tensor is N images when the batch has N placeholders, else one video."""
    if images is None:
        raise ValueError(f"the batch has {num_image_tokens} <image> tokens but no images were given")
    if isinstance(images, torch.Tensor) and images.dim() == 4 and num_image_tokens == images.shape[0] > 1:
        return list(images)
    return images
