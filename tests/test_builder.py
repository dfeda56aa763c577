"""``load_pretrained_model``, the tiny checkpoint writer, and the model card's usage snippet."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llava.model.builder import CheckpointError, load_pretrained_model
from llava.model.tiny import main as tiny_main

REPO_VIDEO = "assets/demo.mp4"


def test_load_pretrained_model_returns_llava_tuple_on_cpu(tiny_checkpoint):
    tokenizer, model, processor, context_len = load_pretrained_model(tiny_checkpoint, None, "tiny", device="cpu")
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert processor.crop_size["height"] == model.config.mm_vision_tower_overrides["image_size"]
    assert context_len == 4096
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == model.config.eos_token_id


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cuda_request_falls_back_to_cpu_with_a_warning(tiny_checkpoint):
    with pytest.warns(UserWarning, match="CUDA is not available"):
        _, model, _, _ = load_pretrained_model(tiny_checkpoint, None, "tiny", use_flash_attn=True)
    assert model.device.type == "cpu"
    assert model.config._attn_implementation == "sdpa"


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained_model(str(tmp_path), None, "x", device="cpu")


def test_non_slow_fast_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(CheckpointError, match="model_type='qwen2'"):
        load_pretrained_model(str(tmp_path), None, "x", device="cpu")


def test_checkpoint_that_does_not_fit_its_config_is_refused(tiny_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="broken"):
        load_pretrained_model(str(broken), None, "x", device="cpu")


def test_tiny_base_checkpoint_is_a_plain_qwen2(tmp_path):
    assert tiny_main([str(tmp_path / "base"), "--base"]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "base"))
    assert model.config.vocab_size == len(tokenizer)


def test_tiny_options_reach_the_config(tmp_path):
    assert tiny_main([str(tmp_path / "m"), "--frames", "16", "--temporal-stride", "2", "--image-size", "96",
                      "--cross-attn-implementation", "vanilla", "--rope-theta", "1e6"]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["video_frames"] == 16 and config["fast_token_temporal_stride"] == 2
    assert config["rope_parameters"]["rope_theta"] == 1e6
    assert config["mm_vision_tower_overrides"]["image_size"] == 96
    assert config["cross_attn_implementation"] == "vanilla"


def test_model_card_snippet_runs_unchanged_on_cpu(tiny_checkpoint, monkeypatch):
    from pathlib import Path

    snippet = (Path(__file__).resolve().parents[1] / "playground" / "model_card_snippet.py").read_text()
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    # the snippet calls disable_torch_init(), which patches torch globally: undo it after the test
    for cls in (torch.nn.Linear, torch.nn.LayerNorm):
        monkeypatch.setattr(cls, "reset_parameters", cls.reset_parameters)
    namespace = {"__name__": "snippet"}
    code = snippet.replace(
        'model_path = "shi-labs/slowfast-video-mllm-qwen2-7b-convnext-576-frame64-s1t4"', f"model_path = {tiny_checkpoint!r}"
    ).replace('video_path = "assets/catinterrupt.mp4"', f"video_path = {REPO_VIDEO!r}")
    assert code != snippet
    exec(compile(code, "model_card_snippet.py", "exec"), namespace)
    assert isinstance(namespace["outputs"], str)


def test_new_projector_gets_pytorch_default_linear_init_and_a_loaded_one_is_kept(tiny_checkpoint):
    from safetensors.torch import load_file

    from conftest import tiny_config
    from llava.model import LlavaQwenSlowFastForCausalLM

    torch.manual_seed(0)
    fresh = LlavaQwenSlowFastForCausalLM(tiny_config())
    first = fresh.model.mm_projector[0]
    bound = 1 / first.in_features**0.5
    assert first.weight.abs().max() <= bound and first.weight.std() > 0.8 * bound / 3**0.5
    assert first.bias.abs().max() <= bound

    _, loaded, _, _ = load_pretrained_model(tiny_checkpoint, device="cpu")
    saved = load_file(f"{tiny_checkpoint}/model.safetensors")
    assert torch.equal(loaded.model.mm_projector[0].weight, saved["model.mm_projector.0.weight"])
