"""Batches planned from the lengths (llava.train.sampling, llava.train.collators): packed rows and token budgets
hold every sample once per epoch within their limits, are drawn from the seed and the epoch alone (so a resumed
run gets the same batches), and keep one modality per optimiser step when asked."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.train.collators import PackedDataCollator
from llava.train.sampling import PlannedBatchSampler, cut_by_token_budget, pack_rows


def _lengths(count: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A mix like LLaVA-Video SFT's at a small scale: long videos, short images, text of very varied length."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=count, p=[0.6, 0.2, 0.2])
    lengths = np.where(kind == 0, 300 + rng.integers(20, 400, count),
                       np.where(kind == 1, 80 + rng.integers(20, 200, count), rng.integers(50, 1500, count)))
    return lengths, kind != 2


def test_packed_rows_hold_every_sample_once_within_their_capacity():
    lengths, _ = _lengths()
    rows = pack_rows(lengths, 2048)
    assert sorted(k for row in rows for k in row) == list(range(len(lengths)))
    assert max(lengths[row].sum() for row in rows) <= 2048
    assert len(rows) <= int(np.ceil(lengths.sum() / 2048)) + 1  # best-fit decreasing: nearly the bound here


def test_a_sample_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="a sample of 300 positions does not fit a packed row of 200"):
        pack_rows([10, 300], 200)


def test_token_budget_batches_stay_within_the_padded_budget():
    lengths, _ = _lengths()
    batches = cut_by_token_budget(lengths, 4096)
    assert sorted(k for b in batches for k in b) == list(range(len(lengths)))
    assert all(len(b) * lengths[b].max() <= 4096 for b in batches)
    sizes = {len(b) for b in batches}
    assert len(sizes) > 3  # a variable number of samples: many short ones, few long ones


@pytest.mark.parametrize("mode", [{"max_packed_length": 2048, "rows_per_batch": 2}, {"max_tokens_per_batch": 4096}])
def test_every_epoch_visits_every_sample_once_in_as_many_micro_batches(mode):
    lengths, _ = _lengths()
    sampler = PlannedBatchSampler(lengths, seed=5, window=128, **mode)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(k for b in batches for k in b) == list(range(len(lengths)))
        epochs.append(batches)
    assert epochs[0] != epochs[1] and sorted(map(sorted, epochs[0])) == sorted(map(sorted, epochs[1]))
    if "max_packed_length" in mode:
        assert all(len(b) >= 2 for b in epochs[0][:-1])  # rows hold several samples
        assert sampler.stats.fill > 0.9


def test_a_resumed_run_draws_the_same_micro_batches():
    lengths, visual = _lengths()
    planned = dict(seed=9, max_packed_length=2048, visual=visual, batches_per_step=4)
    first = PlannedBatchSampler(lengths, **planned)
    first.set_epoch(2)
    resumed = PlannedBatchSampler(lengths, **planned)  # a new process: built again from the lengths and the seed
    resumed.set_epoch(2)
    torch.manual_seed(1234)
    np.random.seed(4321)
    assert list(resumed) == list(first)


def test_a_resumed_epoch_continues_where_the_dataloader_stopped():
    from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler

    lengths, _ = _lengths(200)
    sampler = PlannedBatchSampler(lengths, seed=1, max_tokens_per_batch=4096)
    sampler.set_epoch(1)
    ranks = [list(BatchSamplerShard(sampler, num_processes=2, process_index=r)) for r in range(2)]
    skipped = list(SkipBatchSampler(BatchSamplerShard(sampler, num_processes=2, process_index=1), skip_batches=3))
    assert skipped == ranks[1][3:]
    assert len(ranks[0]) == len(ranks[1])  # every rank takes as many steps


def test_grouped_by_modality_each_optimiser_step_holds_one_modality():
    lengths, visual = _lengths()
    step = 4  # e.g. 2 devices x 2 accumulation steps
    sampler = PlannedBatchSampler(lengths, seed=2, max_packed_length=2048, visual=visual, batches_per_step=step)
    batches = list(sampler)
    mixed_steps = 0
    for start in range(0, len(batches), step):
        kinds = {bool(visual[k]) for b in batches[start : start + step] for k in b}
        mixed_steps += len(kinds) > 1
    assert all(len({bool(visual[k]) for k in b}) == 1 for b in batches)
    assert mixed_steps <= 1  # only where the two modalities' leftover micro-batches meet, at the end


def test_plans_refuse_bad_settings():
    with pytest.raises(ValueError, match="packed rows .* or a token budget"):
        PlannedBatchSampler([5, 6], seed=0)
    with pytest.raises(ValueError, match="rows_per_batch must be a positive integer"):
        PlannedBatchSampler([5, 6], seed=0, max_packed_length=10, rows_per_batch=0)
    with pytest.raises(ValueError, match="does not fit a packed row"):
        PlannedBatchSampler([5, 60], seed=0, max_packed_length=10)


# ----------------------------------------------------------------------------- the packing collator


def _item(ids: list[int], supervised: int, frames: int = 0, fast: int = 6) -> dict:
    ids = torch.tensor(ids)
    labels = ids.clone()
    labels[:-supervised] = IGNORE_INDEX
    labels[ids == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
    pixels = torch.full((frames, 3, 4, 4), float(ids[0])) if frames else None
    positions = len(ids) + (fast - 1 if frames else 0)
    return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "num_positions": positions}


def test_the_packing_collator_fills_rows_by_positions_and_numbers_the_samples():
    items = [
        _item([11, 12, IMAGE_TOKEN_INDEX, 13, 14], 2, frames=2),  # 10 positions
        _item([21, 22, 23], 2),  # 3
        _item([31, IMAGE_TOKEN_INDEX, 32], 1, frames=1),  # 8
        _item([41, 42, 43, 44], 3),  # 4
    ]
    batch = PackedDataCollator(SimpleNamespace(pad_token_id=0), 13)(items)
    rows = [[int(n) for n in row.unique() if n] for row in batch["packed_sample_ids"]]
    assert len(rows) == 2 and sorted(n for row in rows for n in row) == [1, 2, 3, 4]
    for r, row in enumerate(batch["packed_sample_ids"]):
        positions = sum(items[k]["num_positions"] for k in range(4)
                        if any(torch.equal(items[k]["input_ids"], batch["input_ids"][r][row == n]) for n in rows[r]))
        assert positions <= 13
    for number in range(1, 5):
        where = batch["packed_sample_ids"] == number
        k = next(k for k, item in enumerate(items) if torch.equal(item["input_ids"], batch["input_ids"][where]))
        expected = items[k]["labels"].clone()
        expected[0] = IGNORE_INDEX  # nothing in the row before a sample predicts its first token
        assert torch.equal(batch["labels"][where], expected)
    pad = batch["packed_sample_ids"] == 0
    assert not batch["attention_mask"][pad].any() and (batch["labels"][pad] == IGNORE_INDEX).all()
    # images follow their markers through the rows
    marker_owners = batch["packed_sample_ids"][batch["input_ids"] == IMAGE_TOKEN_INDEX].tolist()
    firsts = [int(batch["input_ids"][batch["packed_sample_ids"] == n][0]) for n in marker_owners]
    assert [int(image[0, 0, 0, 0]) for image in batch["images"]] == firsts


def test_the_packing_collator_needs_the_items_positions():
    with pytest.raises(ValueError, match="no 'num_positions'"):
        PackedDataCollator(SimpleNamespace(pad_token_id=0), 12)([{"input_ids": torch.tensor([1]), "labels": torch.tensor([1])}])
