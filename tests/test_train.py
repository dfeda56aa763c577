"""Training pieces in one process: model building, trainable sets, learning-rate groups, loss, resume."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llava.constants import IMAGE_TOKEN_INDEX
from llava.model.tiny import TinySpec, write_tiny_checkpoint, write_tower_file
from llava.train.arguments import ModelArguments, TrainingArguments
from llava.train.checkpoints import checkpoint_problem
from llava.train.data import DataArguments, DataCollatorForSupervisedDataset
from llava.train.train import build_config, build_model, last_checkpoint, main, set_trainable, train
from llava.train.trainer import SlowFastTrainer, parameter_group_of

from conftest import prompt_ids, random_video, tiny_model

SPEC = TinySpec()
OVERRIDES = json.dumps({"depths": SPEC.vision_depths, "dims": SPEC.vision_dims, "image_size": SPEC.image_size})


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base")
    write_tiny_checkpoint(str(path), TinySpec(), base=True)
    write_tower_file(str(path / "tower.safetensors"), SPEC)
    return path


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory) -> Path:
    """A Slow-Fast checkpoint standing for stage 1's output: fast tokens pooled 4x in time, min_fast_frames 1,
    8 frames, length 4096, images padded."""
    path = tmp_path_factory.mktemp("stage1")
    write_tiny_checkpoint(str(path), TinySpec())
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from playground.synthetic_data import generate_dataset

    path = tmp_path_factory.mktemp("data")
    generate_dataset(str(path), num_videos=4, num_images=2, num_text=2, size=64, frames=8, seed=0)
    return path


def stage1_args(base_dir: Path, **overrides) -> ModelArguments:
    fields = dict(
        model_name_or_path=str(base_dir),
        vision_tower_pretrained=str(base_dir / "tower.safetensors"),
        mm_vision_tower_overrides=OVERRIDES,
        cross_attn_every_n_layers=2,
        min_fast_frames=1,
        tune_mm_mlp_adapter=True,
        initialize_cross_attn_kv_from_lm=True,
    )
    fields.update(overrides)
    return ModelArguments(**fields)


def test_training_attention_is_chosen_and_checked(base_dir, tmp_path):
    from llava.train.train import training_attention

    cpu = torch.device("cpu")
    assert training_attention(None, cpu) == "sdpa"
    with pytest.warns(UserWarning, match="SDPA"):  # flash-attn cannot run on a CPU
        assert training_attention("flash_attention_2", cpu) == "sdpa"
    with pytest.raises(ValueError, match="--attn_implementation must be one of"):
        training_attention("flash", cpu)
    model = build_model(stage1_args(base_dir, attn_implementation="eager"), DataArguments(data_path="x"),
                        TrainingArguments(output_dir=str(tmp_path), use_cpu=True))
    assert model.config._attn_implementation == "eager"


def test_stage1_builds_hybrid_model_from_plain_qwen2(base_dir, tmp_path):
    model = build_model(stage1_args(base_dir), DataArguments(data_path="x"), TrainingArguments(output_dir=str(tmp_path)))
    assert model.config.hybrid_layer_indices == [0, 2]
    from safetensors.torch import load_file

    base = load_file(str(base_dir / "model.safetensors"))
    torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight, base["model.layers.1.mlp.up_proj.weight"])
    tower = load_file(str(base_dir / "tower.safetensors"))
    torch.testing.assert_close(model.get_vision_tower().vision_tower.stem[0].weight, tower["stem.0.weight"])
    # per-head key/value initialisation from the language model
    attn = model.model.layers[2].self_attn
    x = torch.randn(1, 3, 64)
    keys, _ = attn.project_slow(x)
    torch.testing.assert_close(keys, attn.k_proj(x).view(1, 3, 2, 16).transpose(1, 2))


def test_stage1_trains_only_projector_and_cross_attention():
    model = tiny_model()
    set_trainable(model, ModelArguments(model_name_or_path="x", tune_mm_mlp_adapter=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("mm_projector" in n or "cross_attn_" in n for n in trainable)
    assert any("cross_attn_warm_up_gate" in n for n in trainable)


def test_stage2_trains_everything_unless_tower_frozen():
    model = tiny_model()
    set_trainable(model, ModelArguments(model_name_or_path="x"))
    assert all(p.requires_grad for p in model.parameters())
    set_trainable(model, ModelArguments(model_name_or_path="x", freeze_mm_vision_encoder=True))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all("vision_tower" in n for n in frozen)


def test_freeze_cross_attn_with_a_zero_warm_up_gate_trains_fast_tokens_only():
    model = tiny_model(warm_up_gate=0.0)
    set_trainable(model, ModelArguments(model_name_or_path="x", freeze_mm_vision_encoder=True, freeze_cross_attn=True))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {n for n in frozen if "vision_tower" not in n} == {n for n, _ in model.named_parameters() if "cross_attn_" in n}

    ids = torch.tensor([[5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9]])
    video = random_video(8)
    logits = model(input_ids=ids, images=[video]).logits
    logits.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "cross_attn_" in n)
    with torch.no_grad():
        for layer in model.hybrid_layers:
            layer.self_attn.cross_attn_kv_proj.weight.normal_()
        # the gate is zero, so the slow path adds nothing whatever its weights
        torch.testing.assert_close(model(input_ids=ids, images=[video]).logits, logits)


def test_optimizer_uses_separate_learning_rates(tmp_path):
    model = tiny_model(slow_token_position_encoding="fourier")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, learning_rate=1e-5, mm_projector_lr=1e-3,
                             cross_attention_layer_lr=2e-4, vision_tower_lr=3e-6, slow_token_position_lr=5e-2,
                             report_to="none")  # fmt: skip
    trainer = SlowFastTrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    by_param = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    expected = {"projector": 1e-3, "cross_attn": 2e-4, "slow_position": 5e-2, "vision_tower": 3e-6, "language_model": 1e-5}
    assert parameter_group_of("model.slow_token_position_encoding.weight") == "slow_position"
    for name, param in model.named_parameters():
        assert by_param[id(param)] == expected[parameter_group_of(name)], name


def test_loss_falls_on_a_fixed_small_batch():
    model = tiny_model().train()
    ids = torch.cat([prompt_ids(3, 8, seed=1), prompt_ids(3, 8, seed=2)])
    labels = ids.clone()
    labels[:, :6] = -100
    videos = [random_video(4, seed=1), random_video(4, seed=2)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=labels, images=videos).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_gradient_checkpointing_reaches_the_vision_tower_and_keeps_the_loss():
    model = tiny_model().train()
    ids, labels = prompt_ids(3, 8, seed=1), prompt_ids(3, 8, seed=1).clamp(min=0)
    video = [random_video(4, seed=1)]
    plain = model(input_ids=ids, labels=labels, images=video).loss
    model.gradient_checkpointing_enable()
    assert all(stage.grad_checkpointing for stage in model.get_vision_tower().vision_tower.stages)
    torch.testing.assert_close(model(input_ids=ids, labels=labels, images=video).loss, plain)
    model.gradient_checkpointing_disable()
    assert not any(stage.grad_checkpointing for stage in model.get_vision_tower().vision_tower.stages)


def common_argv(base_dir: Path, data_dir: Path, out: Path) -> list[str]:
    return [
        "--model_name_or_path", str(base_dir), "--data_path", str(data_dir / "train.json"),
        "--video_folder", str(data_dir), "--image_folder", str(data_dir), "--output_dir", str(out),
        "--vision_tower_pretrained", str(base_dir / "tower.safetensors"), "--mm_vision_tower_overrides", OVERRIDES,
        "--cross_attn_every_n_layers", "2", "--min_fast_frames", "1", "--video_frames", "8", "--fps", "0",
        "--tune_mm_mlp_adapter", "True", "--per_device_train_batch_size", "2", "--model_max_length", "512",
        "--learning_rate", "1e-3", "--use_cpu", "True", "--report_to", "none", "--save_strategy", "steps",
        "--save_steps", "2", "--logging_steps", "1", "--dataloader_num_workers", "0",
    ]


def test_interrupted_run_resumes_from_last_checkpoint(base_dir, data_dir, tmp_path, caplog):
    out = tmp_path / "run"
    train(common_argv(base_dir, data_dir, out) + ["--max_steps", "2"])
    assert last_checkpoint(str(out)).endswith("checkpoint-2")
    caplog.set_level(logging.INFO, logger="llava.train")
    train(common_argv(base_dir, data_dir, out) + ["--max_steps", "4"])
    assert any("resuming from" in r.getMessage() and "checkpoint-2" in r.getMessage() for r in caplog.records)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == [1, 2, 3, 4]


def test_time_budget_stops_after_a_step_with_a_checkpoint_and_exit_status_75(base_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    out = tmp_path / "run"
    # 0.36 ms: spent before the first step ends, however fast the machine (the budget is checked at step ends);
    # a stop saves a checkpoint even with --save_strategy no
    argv = common_argv(base_dir, data_dir, out) + ["--max_steps", "4", "--save_strategy", "no",
                                                   "--max_train_hours", "0.0000001", "--stop_margin_minutes", "0"]
    assert main(argv) == 75
    status = json.loads((out / "run_status.json").read_text())
    assert (status["status"], status["global_step"]) == ("stopped", 1)
    assert checkpoint_problem(out / "checkpoint-1") is None
    assert not (out / "model.safetensors").exists()
    assert main(common_argv(base_dir, data_dir, out) + ["--max_steps", "2", "--save_strategy", "no"]) == 0
    assert json.loads((out / "run_status.json").read_text())["status"] == "finished"
    steps = [e["step"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert steps == [1, 2]


def test_output_is_a_complete_checkpoint(base_dir, data_dir, tmp_path):
    from llava.model.builder import load_pretrained_model

    out = tmp_path / "stage1"
    train(common_argv(base_dir, data_dir, out) + ["--max_steps", "1", "--save_strategy", "no"])
    tokenizer, model, processor, _ = load_pretrained_model(str(out), None, "stage1", device="cpu")
    assert model.config.hybrid_layer_indices == [0, 2] and processor is not None
    assert (out / "preprocessor_config.json").is_file() and (out / "tokenizer.json").is_file()


def test_broken_sample_is_skipped_and_reported(base_dir, data_dir, tmp_path, caplog):
    samples = json.loads((data_dir / "train.json").read_text())
    broken = [{"video": "videos/missing.mp4", "conversations": samples[0]["conversations"]}] + samples
    data = tmp_path / "broken.json"
    data.write_text(json.dumps(broken))
    argv = common_argv(base_dir, data_dir, tmp_path / "out")
    argv[argv.index("--data_path") + 1] = str(data)
    caplog.set_level(logging.INFO)
    train(argv + ["--max_steps", "4", "--save_strategy", "no", "--per_device_train_batch_size", "4"])
    messages = [r.getMessage() for r in caplog.records]
    assert any("missing.mp4" in m and "0" in m for m in messages)
    assert any("skipped 1 sample" in m for m in messages)


def test_text_only_batch_still_trains_the_visual_path_in_stage1():
    model = tiny_model().train()
    set_trainable(model, ModelArguments(model_name_or_path="x", tune_mm_mlp_adapter=True))
    ids = torch.randint(1, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # would fail without a graph through the trainable parameters
    used = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert any("mm_projector" in n for n in used) and any("cross_attn_kv_proj" in n for n in used)
    assert all(p.grad.abs().sum() == 0 for n, p in model.named_parameters() if n in used)


def test_lora_run_saves_a_merged_checkpoint(base_dir, data_dir, tmp_path):
    pytest.importorskip("peft")
    from llava.model.builder import load_pretrained_model

    stage1 = tmp_path / "stage1"
    train(common_argv(base_dir, data_dir, stage1) + ["--max_steps", "1", "--save_strategy", "no"])
    out = tmp_path / "lora"
    argv = common_argv(stage1, data_dir, out)
    argv[argv.index("--tune_mm_mlp_adapter") + 1] = "False"
    train(argv + ["--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "2", "--save_strategy", "no"])
    _, model, _, _ = load_pretrained_model(str(out), None, "lora", device="cpu")
    names = [n for n, _ in model.named_parameters()]
    assert not any("lora_" in n for n in names)
    assert "model.layers.0.self_attn.cross_attn_kv_proj.weight" in names


def test_stage2_applies_the_command_lines_slow_fast_options_and_logs_the_changes(stage1_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="llava.train")
    model_args = ModelArguments(
        model_name_or_path=str(stage1_dir), fast_token_spatial_stride=2, fast_token_temporal_stride=2,
        fast_token_temporal_sampling_stride=2, mm_video_pooling_stride=1, min_fast_frames=3,
    )
    data_args = DataArguments(data_path="x", image_aspect_ratio="square", video_frames=12)
    model = build_model(model_args, data_args, TrainingArguments(output_dir=str(tmp_path), model_max_length=1024))
    config = model.config
    assert (config.fast_token_spatial_stride, config.fast_token_temporal_stride) == (2, 2)
    assert (config.fast_token_temporal_sampling_stride, config.mm_video_pooling_stride, config.min_fast_frames) == (2, 1, 3)
    assert (config.image_aspect_ratio, config.tokenizer_model_max_length) == ("square", 1024)
    # the model pools with them, not only its config
    params = model.slow_fast_params
    assert (params.spatial_stride, params.temporal_stride, params.temporal_sampling_stride) == (2, 2, 2)
    assert (params.video_pooling_stride, params.min_fast_frames) == (1, 3)
    log = " ".join(r.getMessage() for r in caplog.records if r.name == "llava.train")
    for change in ("fast_token_temporal_stride 4 -> 2", "fast_token_spatial_stride 1 -> 2",
                   "fast_token_temporal_sampling_stride 1 -> 2", "mm_video_pooling_stride 2 -> 1",
                   "min_fast_frames 1 -> 3", "image_aspect_ratio 'pad' -> 'square'",
                   "tokenizer_model_max_length 4096 -> 1024"):
        assert change in log, change
    # options the command line leaves out keep the checkpoint's values
    kept, _ = build_config(
        ModelArguments(model_name_or_path=str(stage1_dir)), DataArguments(data_path="x"),
        TrainingArguments(output_dir=str(tmp_path)),
    )
    assert (kept.fast_token_temporal_stride, kept.min_fast_frames, kept.mm_video_pooling_stride) == (4, 1, 2)


def test_saved_config_records_the_trained_frame_count_under_the_references_name(base_dir, stage1_dir, tmp_path):
    stage1, _ = build_config(stage1_args(base_dir), DataArguments(data_path="x", video_frames=12),
                             TrainingArguments(output_dir=str(tmp_path)))
    assert stage1.mm_training_video_frames == stage1.video_frames == 12
    model = build_model(ModelArguments(model_name_or_path=str(stage1_dir)), DataArguments(data_path="x", video_frames=16),
                        TrainingArguments(output_dir=str(tmp_path)))
    model.config.save_pretrained(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["mm_training_video_frames"] == saved["video_frames"] == 16


class _Items(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def _text_sample(length: int, supervised: int, seed: int) -> dict:
    ids = torch.randint(1, 300, (length,), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(ids, -100)
    labels[-supervised:] = ids[-supervised:]
    return {"input_ids": ids, "labels": labels, "pixel_values": None}


def _expected_gradients(model, samples: list[dict], reduction: str) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one optimiser step over ``samples`` (one micro-batch each), computed by hand."""
    model = copy.deepcopy(model).train()
    losses, counts = [], []
    for sample in samples:
        losses.append(model(input_ids=sample["input_ids"][None], labels=sample["labels"][None]).loss)
        counts.append(int((sample["labels"][1:] != -100).sum()))  # the first label is never predicted
    if reduction == "micro_batch":
        loss = sum(losses) / len(losses)
    else:
        loss = sum(l * n for l, n in zip(losses, counts)) / sum(counts)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reduction", ["micro_batch", "token"])
def test_loss_reduction_over_accumulated_micro_batches(reduction, tmp_path):
    # two micro-batches of one sample each, with 3 and 31 supervised tokens, accumulated into one step
    samples = [_text_sample(12, 3, seed=1), _text_sample(40, 31, seed=2)]
    model = tiny_model()
    expected_loss, expected = _expected_gradients(model, samples, reduction)
    _, other = _expected_gradients(model, samples, "token" if reduction == "micro_batch" else "micro_batch")
    assert (expected["lm_head.weight"] - other["lm_head.weight"]).abs().max() > 1e-3  # the two really differ

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # plain SGD at learning rate 1, no clipping: each parameter moves by exactly minus its gradient
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
        per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=1, optim="sgd",
        learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
        dataloader_num_workers=0, loss_reduction=reduction,
    )
    collator = DataCollatorForSupervisedDataset(tokenizer=SimpleNamespace(pad_token_id=0))
    trainer = SlowFastTrainer(model=model, args=args, train_dataset=_Items(samples), data_collator=collator)
    trainer.train()

    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected_loss, rel=1e-5)
    for name, param in model.named_parameters():
        step = before[name] - param.detach()
        torch.testing.assert_close(step, expected.get(name, torch.zeros_like(step)), rtol=1e-4, atol=1e-6, msg=name)


# The reference's recipe scripts (commit 69676a1): frames, fast-token strides and max length differ per recipe.
_REFERENCE_STAGE1 = {"--learning_rate": "1e-3", "--cross_attention_layer_lr": "2e-4", "--per_device_train_batch_size": "2",
                     "--gradient_accumulation_steps": "2", "--model_max_length": "3072", "--tune_mm_mlp_adapter": "True",
                     "--image_aspect_ratio": "square", "--fps": "4", "--min_fast_frames": "16"}
_REFERENCE_STAGE2 = {"--learning_rate": "2e-5", "--per_device_train_batch_size": "1", "--gradient_accumulation_steps": "2",
                     "--group_by_modality_length": "True", "--image_aspect_ratio": "pad", "--fps": "4",
                     "--min_fast_frames": "16"}
_RECIPES = [
    ("pretrain/pretrain_frame64-s1t4.sh", _REFERENCE_STAGE1, "zero2.json", 64, 1, 4, None),
    ("pretrain/pretrain_frame96-s1t6.sh", _REFERENCE_STAGE1, "zero2.json", 96, 1, 6, None),
    ("pretrain/pretrain_frame128-s2t4.sh", _REFERENCE_STAGE1, "zero2.json", 128, 2, 4, None),
    ("finetune/finetune_frame64-s1t4.sh", _REFERENCE_STAGE2, "zero3.json", 64, 1, 4, "4096"),
    ("finetune/finetune_frame96-s1t6.sh", _REFERENCE_STAGE2, "zero3.json", 96, 1, 6, "3072"),
    ("finetune/finetune_frame128-s2t4.sh", _REFERENCE_STAGE2, "zero3.json", 128, 2, 4, "3072"),
]


@pytest.mark.parametrize("script, common, deepspeed, frames, sampling, temporal, max_length", _RECIPES)
def test_recipe_passes_the_references_settings(script, common, deepspeed, frames, sampling, temporal, max_length, tmp_path):
    repo = Path(__file__).resolve().parents[1]
    # a stand-in interpreter: no CUDA, and it prints the trainer's command line instead of running it
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\n[[ "$1" == "-c" ]] && exit 1\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), DATA_PATH="data.json", VIDEO_DIR="videos")
    result = subprocess.run(
        ["bash", str(repo / "scripts" / script)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    argv = result.stdout.splitlines()
    argv = argv[argv.index("llava.train.train") + 1 :]
    assert all(flag.startswith("--") for flag in argv[::2]), argv
    given = {}
    for flag, value in zip(argv[::2], argv[1::2]):
        given[flag] = value  # the last occurrence wins, as in argparse
    expected = dict(common, **{
        "--video_frames": str(frames), "--fast_token_temporal_sampling_stride": str(sampling),
        "--fast_token_temporal_stride": str(temporal), "--fast_token_spatial_stride": "1", "--mm_video_pooling_stride": "2",
    })
    if max_length:
        expected["--model_max_length"] = max_length
    assert {flag: given.get(flag) for flag in expected} == expected
    assert given["--deepspeed"].endswith(deepspeed)
    assert given["--image_folder"] == "videos"
