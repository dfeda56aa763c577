"""The real launch path on CPU: tiny Qwen2 base -> pretrain script (torchrun, 2 processes, ZeRO-2) -> SFT
script (ZeRO-3) -> the CLI answers a question about a synthetic video from the SFT checkpoint."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = json.dumps({"depths": [1, 1, 1, 1], "dims": [16, 24, 32, 48], "image_size": 64})

pytest.importorskip("deepspeed", reason="the end-to-end run needs the 'train' extra (DeepSpeed)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / script), *args],
        env=env, capture_output=True, text=True, timeout=900, cwd=str(REPO),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from llava.model.tiny import TinySpec, write_tiny_checkpoint, write_tower_file
    from playground.synthetic_data import generate_dataset

    root = tmp_path_factory.mktemp("e2e")
    write_tiny_checkpoint(str(root / "base"), TinySpec(), base=True)
    write_tower_file(str(root / "base" / "tower.safetensors"), TinySpec())
    generate_dataset(str(root / "data"), num_videos=6, num_images=2, num_text=2, size=64, frames=16, seed=0)
    return root


def launch_env(root: Path, model: Path, out: Path) -> dict:
    env = dict(os.environ)
    env.update(
        PYTHON=sys.executable, MODEL=str(model), DATA_PATH=str(root / "data" / "train.json"),
        VIDEO_DIR=str(root / "data"), OUTPUT_DIR=str(out), NPROC_PER_NODE="2", MASTER_PORT=str(free_port()),
        CUDA_VISIBLE_DEVICES="",
    )
    return env


SMALL_RUN = ["--video_frames", "8", "--min_fast_frames", "1", "--max_steps", "3", "--per_device_train_batch_size", "2",
             "--gradient_accumulation_steps", "1", "--dataloader_num_workers", "0", "--model_max_length", "512",
             "--save_strategy", "no"]


def test_pretrain_then_sft_then_cli(workdir):
    stage1, stage2 = workdir / "stage1", workdir / "stage2"
    pretrain = run_script(
        "pretrain/pretrain_frame64-s1t4.sh", launch_env(workdir, workdir / "base", stage1),
        "--vision_tower_pretrained", str(workdir / "base" / "tower.safetensors"),
        "--mm_vision_tower_overrides", OVERRIDES, "--cross_attn_every_n_layers", "2", *SMALL_RUN,
    )
    assert "'loss'" in pretrain.stdout + pretrain.stderr
    samples = len(json.loads((workdir / "data" / "train.json").read_text()))
    state = json.loads((stage1 / "trainer_state.json").read_text())
    # an epoch has ceil(samples / 2 processes / 2 per device) steps: the run really was distributed
    assert state["global_step"] == 3 and state["epoch"] == pytest.approx(3 / math.ceil(samples / 4), abs=0.01)
    config = json.loads((stage1 / "config.json").read_text())
    assert config["model_type"] == "llava_qwen_slow_fast" and config["cross_attn_every_n_layers"] == 2

    sft = run_script("finetune/finetune_frame64-s1t4.sh", launch_env(workdir, stage1, stage2), *SMALL_RUN)
    assert "'loss'" in sft.stdout + sft.stderr
    state = json.loads((stage2 / "trainer_state.json").read_text())
    assert state["global_step"] == 3

    cli = subprocess.run(
        [sys.executable, "-m", "llava.serve.cli", "--model-path", str(stage2),
         "--video", str(workdir / "data" / "videos" / "train_0000.mp4"),
         "--question", "What color is the square?", "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=300, cwd=str(REPO),
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip()
