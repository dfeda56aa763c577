"""The ConvNeXt tower: layer-scale naming, weights from timm-layout files, chunked encoding."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from timm.models.convnext import ConvNeXt

from conftest import tiny_model


def test_layer_scale_is_named_weight_like_the_reference():
    tower = tiny_model().get_vision_tower()
    names = dict(tower.named_parameters())
    assert "vision_tower.stages.0.blocks.0.weight" in names
    assert not any(name.endswith("gamma") for name in names)


def test_features_are_last_stage_grid_tokens():
    tower = tiny_model().get_vision_tower()
    out = tower(torch.randn(2, 3, 128, 128))
    assert out.shape == (2, 16, 32)


def test_output_stride_16_doubles_the_grid_side():
    model = tiny_model(mm_vision_tower_overrides={"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "image_size": 64,
                                                  "output_stride": 16})  # fmt: skip
    tower = model.get_vision_tower()
    assert tower.num_patches_per_side == 4
    assert tower(torch.randn(2, 3, 64, 64)).shape == (2, 16, 32)


@pytest.mark.parametrize("prefix", ["", "visual.trunk."])
def test_new_model_loads_tower_weights_from_a_timm_or_open_clip_file(tmp_path, prefix):
    torch.manual_seed(3)
    source = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=0, norm_eps=1e-5).eval()
    with torch.no_grad():
        for block in source.modules():
            if hasattr(block, "gamma") and isinstance(block.gamma, torch.nn.Parameter):
                block.gamma.normal_()
    path = tmp_path / "tower.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = tiny_model(vision_tower_pretrained=str(path))
    model.load_vision_tower_weights()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        expected = source.forward_features(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(model.get_vision_tower()(x), expected)


def test_tower_file_that_does_not_fit_is_a_clear_error(tmp_path):
    source = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 24, 40), num_classes=0)
    path = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    with pytest.raises((ValueError, RuntimeError), match="tower"):
        tiny_model().load_vision_tower_weights(str(path))
