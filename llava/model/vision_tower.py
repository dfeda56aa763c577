"""The ``convnext-576`` vision tower: timm's ConvNeXt (CLIP LAION-2B "soup" ConvNeXt-XXL by default) and its
CLIP-style image processor.

Features are the output of the last stage, ``image_size / 32`` squared tokens per frame (18 x 18 = 324 of
width 3072 at 576 px). Parameter names follow the reference checkpoints: the timm model sits under
``vision_tower.`` and each block's layer-scale vector is named ``weight`` (timm calls it ``gamma``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from torch import nn
from transformers import CLIPImageProcessorPil

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TIMM_PRETRAINED_NAME = "convnext_xxlarge.clip_laion2b_soup"


@dataclass(frozen=True)
class TowerSpec:
    """Shape of a ConvNeXt tower."""

    depths: tuple[int, ...] = (3, 4, 30, 3)
    dims: tuple[int, ...] = (384, 768, 1536, 3072)
    image_size: int = 576
    norm_eps: float = 1e-5
    output_stride: int = 32  # 16 or 8 dilate the last stage(s): a finer grid for tiny images

    @classmethod
    def from_config(cls, config) -> "TowerSpec":
        overrides = dict(getattr(config, "mm_vision_tower_overrides", None) or {})
        spec = cls()
        return cls(
            depths=tuple(overrides.get("depths", spec.depths)),
            dims=tuple(overrides.get("dims", spec.dims)),
            image_size=int(overrides.get("image_size", spec.image_size)),
            norm_eps=float(overrides.get("norm_eps", spec.norm_eps)),
            output_stride=int(overrides.get("output_stride", spec.output_stride)),
        )

    @property
    def hidden_size(self) -> int:
        return self.dims[-1]

    @property
    def grid_size(self) -> int:
        return self.image_size // self.output_stride


class _ConvNeXtBlockWeightNamed(ConvNeXtBlock):
    """timm's block whose layer scale is registered as ``weight``; ``gamma`` stays readable for timm's forward."""

    @property
    def gamma(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._parameters.get("weight")


def _rename_layer_scales(model: nn.Module) -> None:
    for block in model.modules():
        if type(block) is ConvNeXtBlock:
            gamma = block._parameters.pop("gamma", None)
            block.__class__ = _ConvNeXtBlockWeightNamed
            if gamma is not None:
                block.register_parameter("weight", gamma)


def _unused_head_as_buffers(model: nn.Module) -> None:
    """Keep the classifier head's norm (present in the reference checkpoints, never used: features come from
    the last stage) as buffers, so that it loads and saves under its names but is no parameter. A trainable
    parameter without a gradient makes DDP fail when ``find_unused_parameters`` is off."""
    head = getattr(model, "head", None)
    for module in head.modules() if head is not None else ():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            with _full_parameter(param):  # under ZeRO-3 the parameter is already partitioned here
                value = param.detach().clone()
            del module._parameters[name]
            module.register_buffer(name, value, persistent=True)


def _full_parameter(param: nn.Parameter):
    """A context in which a DeepSpeed ZeRO-3 partitioned parameter holds its full value (no-op otherwise)."""
    if hasattr(param, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([param])
    from contextlib import nullcontext

    return nullcontext()


def timm_to_reference_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename timm's ``stages.i.blocks.j.gamma`` to the reference's ``stages.i.blocks.j.weight``."""
    return {(k[: -len("gamma")] + "weight" if k.endswith(".gamma") else k): v for k, v in state_dict.items()}


def build_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """The CLIP-style processor: short side to ``image_size`` (bicubic), centre crop, [0, 1], CLIP mean/std."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


class ConvNeXtVisionTower(nn.Module):
    """Frames ``[N, 3, S, S]`` -> last-stage features ``[N, (S/32)^2, dims[-1]]`` (``S/output_stride`` per side)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.spec = TowerSpec.from_config(config)
        self.chunk_frames = getattr(config, "mm_vision_chunk_frames", None)
        # num_classes=0: the classifier is never used, and its size differs between checkpoints.
        self.vision_tower = ConvNeXt(
            depths=self.spec.depths,
            dims=self.spec.dims,
            num_classes=0,
            norm_eps=self.spec.norm_eps,
            output_stride=self.spec.output_stride,
        )
        _rename_layer_scales(self.vision_tower)
        _unused_head_as_buffers(self.vision_tower)
        self.image_processor = build_image_processor(self.spec.image_size)

    @property
    def hidden_size(self) -> int:
        return self.spec.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.spec.grid_size

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.stem[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.stem[0].weight.device

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.vision_tower.forward_features(pixel_values.to(self.dtype))
        return features.flatten(2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
        """Encode ``[N, 3, S, S]`` frames; with ``chunk_frames`` (or the config's) at most that many at once."""
        chunk = chunk_frames or self.chunk_frames
        if not chunk or pixel_values.shape[0] <= chunk:
            return self._encode(pixel_values)
        return torch.cat([self._encode(part) for part in pixel_values.split(chunk)], dim=0)

    def load_pretrained(self, source: str) -> None:
        """Load tower weights from a local file (timm, open_clip or reference layout) or a timm pretrained name."""
        if os.path.exists(source):
            state = _read_state_dict(source)
        else:
            import timm

            try:
                pretrained = timm.create_model(source, pretrained=True, num_classes=0)
            except Exception as err:  # noqa: BLE001 - surface the cause with the name that failed
                raise ValueError(f"vision_tower_pretrained={source!r}: not a file, and timm could not load it: {err}")
            state = pretrained.state_dict()
        state = _to_timm_layout(state, self.vision_tower)
        state = {k: v for k, v in timm_to_reference_keys(state).items() if not k.startswith("head.fc.")}
        try:
            missing, unexpected = self.vision_tower.load_state_dict(state, strict=False)
        except RuntimeError as err:
            first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
            raise ValueError(f"vision_tower_pretrained={source!r} does not fit the tower {self.spec}: {first}") from None
        missing = [k for k in missing if not k.startswith("head.")]
        if missing:
            raise ValueError(
                f"vision_tower_pretrained={source!r} does not fit the tower {self.spec}: "
                f"missing {len(missing)} keys, e.g. {missing[:3]}; unexpected e.g. {list(unexpected)[:3]}"
            )


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _to_timm_layout(state: dict[str, torch.Tensor], model: ConvNeXt) -> dict[str, torch.Tensor]:
    """Strip known prefixes and convert open_clip checkpoints with timm's own filter."""
    from timm.models.convnext import checkpoint_filter_fn

    for prefix in ("model.vision_tower.vision_tower.", "vision_tower.vision_tower.", "vision_tower."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            break
    # Reference layout names the layer scale `weight`; timm's filter expects `gamma`.
    state = {
        (k[: -len("weight")] + "gamma" if _is_block_layer_scale(k) else k): v for k, v in state.items()
    }
    return checkpoint_filter_fn(state, model)


def _is_block_layer_scale(key: str) -> bool:
    parts = key.split(".")
    return len(parts) == 5 and parts[0] == "stages" and parts[2] == "blocks" and parts[4] == "weight"


__all__ = ["ConvNeXtVisionTower", "TowerSpec", "build_image_processor", "CLIP_MEAN", "CLIP_STD", "TIMM_PRETRAINED_NAME"]
