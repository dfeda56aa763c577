"""The real launch path on CPU: tiny Qwen2 base -> pretrain script (torchrun, 2 processes, ZeRO-2) -> SFT
script (ZeRO-3) on a mixture of three sources with their own folders and amounts -> the CLI answers a question
about a synthetic video from the SFT checkpoint."""

from __future__ import annotations

import json
import math
import os
import shutil
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


def write_mixture(root: Path) -> Path:
    """Split the synthetic set into three sources, each in its own folder: the clips (half of them), the stills
    (each twice) and the text samples (3 of them), in a YAML mixture."""
    samples = json.loads((root / "data" / "train.json").read_text())
    sources = root / "sources"
    shutil.copytree(root / "data" / "videos", sources / "clip_media")
    shutil.copytree(root / "data" / "images", sources / "still_media")
    clips = [dict(s, video=Path(s["video"]).name) for s in samples if "video" in s]
    stills = [dict(s, image=Path(s["image"]).name) for s in samples if "image" in s]
    chat = [s for s in samples if "video" not in s and "image" not in s]
    (sources / "clips.json").write_text(json.dumps(clips))
    (sources / "stills.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stills))
    (sources / "chat.json").write_text(json.dumps(chat))
    mixture = sources / "mix.yaml"
    mixture.write_text(
        "sources:\n"
        "  - {annotation: clips.json, video_folder: clip_media, ratio: 0.5}\n"
        "  - {annotation: stills.jsonl, image_folder: still_media, percent: 200}\n"
        "  - {annotation: chat.json, count: 3}\n"
    )
    return mixture


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


@pytest.fixture(scope="module")
def pretrained(workdir) -> tuple[Path, subprocess.CompletedProcess]:
    """Stage 1 through the pretrain script (torchrun, 2 processes, ZeRO-2): its folder and the run."""
    stage1 = workdir / "stage1"
    pretrain = run_script(
        "pretrain/pretrain_frame64-s1t4.sh", launch_env(workdir, workdir / "base", stage1),
        "--vision_tower_pretrained", str(workdir / "base" / "tower.safetensors"),
        "--mm_vision_tower_overrides", OVERRIDES, "--cross_attn_every_n_layers", "2", *SMALL_RUN,
    )
    return stage1, pretrain


def test_pretrain_then_sft_then_cli(workdir, pretrained):
    (stage1, pretrain), stage2 = pretrained, workdir / "stage2"
    assert "'loss'" in pretrain.stdout + pretrain.stderr
    samples = len(json.loads((workdir / "data" / "train.json").read_text()))
    state = json.loads((stage1 / "trainer_state.json").read_text())
    # an epoch has ceil(samples / 2 processes / 2 per device) steps: the run really was distributed
    assert state["global_step"] == 3 and state["epoch"] == pytest.approx(3 / math.ceil(samples / 4), abs=0.01)
    config = json.loads((stage1 / "config.json").read_text())
    assert config["model_type"] == "llava_qwen_slow_fast" and config["cross_attn_every_n_layers"] == 2

    env = launch_env(workdir, stage1, stage2)
    env.update(DATA_PATH=str(write_mixture(workdir)), VIDEO_DIR=str(workdir / "nowhere"))  # sources' own folders
    sft = run_script("finetune/finetune_frame64-s1t4.sh", env, *SMALL_RUN)
    log = sft.stdout + sft.stderr
    assert "'loss'" in log and "3 sources" in log
    videos = sum("video" in s for s in json.loads((workdir / "data" / "train.json").read_text()))
    assert f"clips: {round(videos / 2)} of {videos} samples (ratio 0.5" in log and "chat: 3 of 2 samples" in log
    state = json.loads((stage2 / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert "no sample skipped" in log  # every path resolved against its source's folder

    cli = subprocess.run(
        [sys.executable, "-m", "llava.serve.cli", "--model-path", str(stage2),
         "--video", str(workdir / "data" / "videos" / "train_0000.mp4"),
         "--question", "What color is the square?", "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=300, cwd=str(REPO),
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip()


def test_zero3_step_with_a_text_only_batch_on_one_rank_and_a_video_on_the_other(workdir, pretrained):
    # Both ranks must gather the tower's and the embeddings' partitioned parameters in the same order, whichever
    # kind of batch each got (the length-grouped sampler mixes them in an epoch's last batch).
    samples = json.loads((workdir / "data" / "train.json").read_text())
    video = next(s for s in samples if "video" in s)
    text = next(s for s in samples if "video" not in s and "image" not in s)
    data = workdir / "mixed.json"
    data.write_text(json.dumps([video, text]))
    env = launch_env(workdir, pretrained[0], workdir / "mixed_sft")
    env.update(DATA_PATH=str(data))
    args = [a if a != "2" or i == 0 or SMALL_RUN[i - 1] != "--per_device_train_batch_size" else "1"
            for i, a in enumerate(SMALL_RUN)]
    args[args.index("--max_steps") + 1] = "1"
    sft = run_script("finetune/finetune_frame64-s1t4.sh", env, *args)
    assert "'loss'" in sft.stdout + sft.stderr
    assert json.loads((workdir / "mixed_sft" / "trainer_state.json").read_text())["global_step"] == 1
