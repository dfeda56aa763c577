"""Packing and token budgets in training (llava.train.loader, SlowFastTrainer): the flags' checks, what
--loss_reduction means for packed micro-batches (checked on the optimiser step), budgeted micro-batches, and a
packed run through the SFT recipe (2 processes, ZeRO-3, gradient checkpointing, a mixture, modality grouping)
resumed from a checkpoint with the uninterrupted run's losses."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llava.constants import IGNORE_INDEX
from llava.train.arguments import TrainingArguments
from llava.train.collators import DataCollatorForSupervisedDataset, PackedDataCollator
from llava.train.lengths import SampleLengths
from llava.train.trainer import SlowFastTrainer

from conftest import tiny_model
from test_train_resume import free_port, log_of, step_logs

REPO = Path(__file__).resolve().parents[1]
PAD = SimpleNamespace(pad_token_id=0)


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"max_packed_length": 8192}, "--max_packed_length has no effect without --packing"),
        ({"packing": True, "max_packed_length": 1024}, "--max_packed_length 1024 is below --model_max_length 4096"),
        ({"max_tokens_per_batch": 2048}, "--max_tokens_per_batch 2048 is below --model_max_length 4096"),
        ({"packing": True, "max_packed_length": 8192, "max_tokens_per_batch": 4096},
         "--max_tokens_per_batch 4096 is below --max_packed_length 8192"),
        ({"packing": True, "max_packed_length": 0}, "--max_packed_length must be a positive integer"),
    ],
)
def test_batching_flags_are_checked_at_start_up(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        TrainingArguments(output_dir=str(tmp_path), **flags)


def test_packing_rows_default_to_the_model_max_length(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), packing=True, model_max_length=3072)
    assert args.max_packed_length == 3072


# ----------------------------------------------------------------------------- loss reduction with packing


class _Items(torch.utils.data.Dataset):
    """Text-only items with their lengths known up front, as LazySupervisedDataset's."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items
        positions = np.array([item["num_positions"] for item in items])
        self.sample_lengths = SampleLengths(positions, np.zeros_like(positions), np.zeros(len(items), dtype=bool))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def _text_item(length: int, supervised: int, seed: int) -> dict:
    ids = torch.randint(1, 300, (length,), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-supervised:] = ids[-supervised:]
    return {"input_ids": ids, "labels": labels, "pixel_values": None, "num_positions": length}


class _Recording:
    """A collator that records the items of every micro-batch it makes."""

    def __init__(self, collator) -> None:
        self.collator, self.batches = collator, []

    def __call__(self, items):
        self.batches.append([dict(item) for item in items])
        return self.collator(items)


def _hand_step(model, micro_batches: list[list[dict]], reduction: str) -> dict[str, torch.Tensor]:
    """The gradient of one optimiser step over ``micro_batches``, each sample run alone."""
    model = copy.deepcopy(model).train()
    sums, counts = [], []
    for batch in micro_batches:
        total, count = 0.0, 0
        for item in batch:
            n = int((item["labels"][1:] != IGNORE_INDEX).sum())
            loss = model(input_ids=item["input_ids"][None], labels=item["labels"][None]).loss
            total, count = total + loss * n, count + n
        sums.append(total)
        counts.append(count)
    if reduction == "micro_batch":  # each micro-batch's mean over its tokens, averaged over the micro-batches
        loss = sum(s / c for s, c in zip(sums, counts)) / len(sums)
    else:  # every supervised token of the step alike
        loss = sum(sums) / sum(counts)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reduction", ["micro_batch", "token"])
def test_loss_reduction_keeps_its_meaning_for_packed_micro_batches(reduction, tmp_path):
    lengths = [12, 40, 9, 25, 30, 7, 18, 33]
    supervised = [3, 31, 2, 10, 20, 5, 9, 4]
    items = [_text_item(n, s, seed=k) for k, (n, s) in enumerate(zip(lengths, supervised))]
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", per_device_train_batch_size=1,
        gradient_accumulation_steps=2, max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
        max_grad_norm=0.0, weight_decay=0.0, dataloader_num_workers=0, loss_reduction=reduction,
        packing=True, model_max_length=48, max_packed_length=64,
    )
    collator = _Recording(PackedDataCollator(PAD, 64))
    SlowFastTrainer(model=model, args=args, train_dataset=_Items(items), data_collator=collator).train()
    used = collator.batches[:2]  # accelerate's loader reads one micro-batch ahead
    assert all(len(batch) > 1 for batch in used)  # packed micro-batches of several samples
    expected = _hand_step(tiny_model(), used, reduction)
    for name, param in model.named_parameters():
        step = before[name] - param.detach()
        torch.testing.assert_close(step, expected.get(name, torch.zeros_like(step)), rtol=1e-4, atol=1e-6, msg=name)


def test_token_budget_micro_batches_vary_in_size_and_stay_within_the_budget(tmp_path):
    rng = np.random.default_rng(0)
    lengths = [int(n) for n in rng.integers(5, 60, 40)]
    items = [_text_item(n, 2, seed=k) for k, n in enumerate(lengths)]
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="no", per_device_train_batch_size=1,
        max_steps=4, dataloader_num_workers=0, model_max_length=64, max_tokens_per_batch=128,
    )
    collator = _Recording(DataCollatorForSupervisedDataset(PAD))
    SlowFastTrainer(model=tiny_model(), args=args, train_dataset=_Items(items), data_collator=collator).train()
    sizes = [len(batch) for batch in collator.batches]
    assert len(collator.batches) >= 4 and len(set(sizes)) > 1
    assert all(len(batch) * max(len(i["input_ids"]) for i in batch) <= 128 for batch in collator.batches)


# ----------------------------------------------------------------------------- a packed SFT run, resumed

STEPS = 6


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory) -> Path:
    """A Slow-Fast checkpoint and a mixture of visual and text-only samples."""
    from llava.model.tiny import TinySpec, write_tiny_checkpoint
    from playground.synthetic_data import generate_dataset

    root = tmp_path_factory.mktemp("packed-sft")
    write_tiny_checkpoint(str(root / "stage1"), TinySpec())
    generate_dataset(str(root / "data"), num_videos=6, num_images=3, num_text=8, size=64, frames=8, seed=0)
    samples = json.loads((root / "data" / "train.json").read_text())
    visual = [s for s in samples if "video" in s or "image" in s]
    text = [s for s in samples if "video" not in s and "image" not in s]
    (root / "data" / "visual.json").write_text(json.dumps(visual))
    (root / "data" / "text.jsonl").write_text("".join(json.dumps(s) + "\n" for s in text))
    (root / "mix.yaml").write_text(
        "sources:\n  - annotation: data/visual.json\n    image_folder: data\n"
        "  - annotation: data/text.jsonl\n    percent: 200\n"
    )
    return root


def run_sft(root: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, MODEL=str(root / "stage1"), DATA_PATH=str(root / "mix.yaml"),
               VIDEO_DIR=str(root / "data"), OUTPUT_DIR=str(out), NPROC_PER_NODE="2", MASTER_PORT=str(free_port()),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    command = ["bash", str(REPO / "scripts" / "finetune" / "finetune_frame64-s1t4.sh"),
               "--packing", "True", "--model_max_length", "128", "--max_packed_length", "160",
               "--video_frames", "4", "--min_fast_frames", "1", "--max_steps", str(STEPS), "--save_steps", "2",
               "--save_total_limit", "10", "--dataloader_num_workers", "1", "--seed", "3"]
    with open(out.parent / f"{out.name}.log", "a") as log:
        return subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), timeout=900)


def test_a_resumed_packed_run_reproduces_the_uninterrupted_losses(sft_workdir):
    reference = sft_workdir / "reference"
    assert run_sft(sft_workdir, reference).returncode == 0, log_of(reference)[-4000:]
    log = log_of(reference)
    assert "training batches: packed rows of at most 160 positions" in log
    expected = step_logs(reference / "trainer_state.json")
    assert [e["step"] for e in expected] == list(range(1, STEPS + 1))

    resumed = sft_workdir / "resumed"
    resumed.mkdir()
    shutil.copytree(reference / "checkpoint-2", resumed / "checkpoint-2")  # as if the run had stopped after step 2
    assert run_sft(sft_workdir, resumed).returncode == 0, log_of(resumed)[-4000:]
    assert f"resuming from {resumed}/checkpoint-2" in log_of(resumed)
    again = step_logs(resumed / "trainer_state.json")
    assert [e["step"] for e in again] == [e["step"] for e in expected]
    for mine, theirs in zip(again, expected):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6), mine["step"]
    epochs = {round(e["epoch"], 6) for e in expected}
    assert any(not float(e).is_integer() for e in epochs if e > 1)  # a later epoch is entered part-way: mid-epoch data
