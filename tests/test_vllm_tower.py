"""The vLLM plugin's timm-free ConvNeXt (``llava.vllm.convnext``) computes what the project's timm tower computes,
from the same weights: vLLM's CPU build cannot import timm, so the plugin runs this copy of the network."""

from __future__ import annotations

import pytest
import torch

from llava.model.vision_tower import ConvNeXtVisionTower
from llava.vllm.convnext import ConvNeXtTower, TowerShape

from conftest import tiny_config


@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_plugin_tower_equals_the_timm_tower_for_every_output_stride(output_stride):
    overrides = {"depths": [1, 1, 2, 1], "dims": [8, 16, 24, 32], "image_size": 64, "output_stride": output_stride}
    config = tiny_config(mm_vision_tower_overrides=overrides)
    torch.manual_seed(0)
    timm_tower = ConvNeXtVisionTower(config).eval()
    with torch.no_grad():
        for param in timm_tower.parameters():
            param.normal_(0, 0.2)
    plugin_tower = ConvNeXtTower(TowerShape.from_config(config)).eval()
    # the checkpoint's names, as the model saves them (timm's, layer scale named `weight`, head norm as buffers)
    plugin_tower.load_state_dict(timm_tower.state_dict(), strict=True)
    frames = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected, got = timm_tower(frames), plugin_tower(frames)
    assert got.shape == expected.shape == (3, (64 // output_stride) ** 2, 32)
    assert torch.equal(got, expected)


def test_plugin_tower_refuses_a_shape_it_cannot_build():
    with pytest.raises(ValueError, match="4 depths and 4 dims"):
        ConvNeXtTower(TowerShape(depths=(1, 1, 1), dims=(8, 16, 24)))
    with pytest.raises(ValueError, match="output_stride"):
        ConvNeXtTower(TowerShape(output_stride=4))
