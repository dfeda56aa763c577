"""Parity with tests/fixtures/reference_tiny (numbers from the reference implementation)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from llava.model import LlavaQwenSlowFastForCausalLM
from llava.model.vision_tower import build_image_processor


@pytest.fixture(scope="module")
def reference(fixture_dir):
    model, info = LlavaQwenSlowFastForCausalLM.from_pretrained(
        str(fixture_dir / "checkpoint"), output_loading_info=True
    )
    return model.eval(), info


@pytest.fixture(scope="module")
def inputs(fixture_dir):
    return load_file(str(fixture_dir / "inputs.safetensors"))


@pytest.fixture(scope="module")
def expected(fixture_dir):
    return load_file(str(fixture_dir / "expected.safetensors"))


def test_reference_checkpoint_loads_without_missing_or_mismatched_keys(reference):
    _, info = reference
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["mismatched_keys"]
    # only the tower's unused classifier is dropped
    assert all(".head.fc." in key for key in info["unexpected_keys"])


def test_auto_classes_load_reference_config_without_remote_code(fixture_dir):
    import llava.model  # noqa: F401  (registers the architecture)

    config = AutoConfig.from_pretrained(str(fixture_dir / "checkpoint"))
    assert type(config).__name__ == "LlavaQwenSlowFastConfig"
    model = AutoModelForCausalLM.from_pretrained(str(fixture_dir / "checkpoint"))
    assert isinstance(model, LlavaQwenSlowFastForCausalLM)


def test_forward_logits_and_loss_match_reference(reference, inputs, expected):
    model, _ = reference
    with torch.no_grad():
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=inputs["labels"],
            images=[inputs["pixel_values_0"], inputs["pixel_values_1"]],
        )
    valid = expected["valid_mask"].bool()
    assert out.logits.shape == expected["logits"].shape
    assert (out.logits[valid] - expected["logits"][valid]).abs().max().item() <= 1e-4
    assert abs(out.loss.item() - expected["loss"].item()) <= 1e-5


def test_greedy_tokens_match_reference_in_reference_decode_mode(reference, inputs, expected):
    model, _ = reference
    model.config.cross_attn_decode_mode = "reference"
    try:
        tokens = model.generate(
            inputs["prompt_ids_0"][None], images=[inputs["pixel_values_0"]], max_new_tokens=6, do_sample=False
        )
    finally:
        model.config.cross_attn_decode_mode = "attend"
    assert tokens[0].tolist() == expected["greedy_tokens_0"].tolist()


def test_attend_decode_mode_differs_from_reference_after_first_token(reference, inputs, expected):
    model, _ = reference
    tokens = model.generate(
        inputs["prompt_ids_0"][None], images=[inputs["pixel_values_0"]], max_new_tokens=6, do_sample=False
    )
    # the first token comes from the prefill, identical in both modes; later ones read the slow tokens
    assert tokens[0, 0].item() == expected["greedy_tokens_0"][0].item()
    assert tokens[0].tolist() != expected["greedy_tokens_0"].tolist()


@pytest.mark.parametrize("name", ["wide", "tall"])
def test_image_processor_matches_reference(fixture_dir, name):
    data = load_file(str(fixture_dir / "preprocess.safetensors"))
    processor = build_image_processor(128)
    pixels = processor.preprocess(data[f"{name}_frames_uint8"].numpy(), return_tensors="pt")["pixel_values"]
    assert pixels.shape == data[f"{name}_pixel_values"].shape
    assert (pixels - data[f"{name}_pixel_values"]).abs().max().item() <= 2e-2


def test_saved_checkpoint_keeps_reference_key_names(reference, fixture_dir, tmp_path):
    model, _ = reference
    model.save_pretrained(tmp_path)
    with safe_open(str(fixture_dir / "checkpoint" / "model.safetensors"), "pt") as f:
        reference_keys = {k for k in f.keys() if ".head.fc." not in k}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved_keys = set(f.keys())
    assert saved_keys == reference_keys
