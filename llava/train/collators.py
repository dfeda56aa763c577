"""Batches of training samples: padded rows, one sample each, or packed rows of several samples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

from .sampling import pack_rows

__all__ = ["DataCollatorForSupervisedDataset", "PackedDataCollator"]


def _check_items(instances: Sequence[Mapping[str, Any]]) -> None:
    if not instances:
        raise ValueError("cannot collate an empty batch")
    for b, item in enumerate(instances):
        if item["input_ids"].shape != item["labels"].shape:
            raise ValueError(
                f"batch item {b}: input_ids {tuple(item['input_ids'].shape)} and labels "
                f"{tuple(item['labels'].shape)} differ in shape"
            )


def _pad_token_id(tokenizer: Any) -> int:
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before collating")
    return tokenizer.pad_token_id


@dataclass
class DataCollatorForSupervisedDataset:
    """Pad a list of :class:`~llava.train.data.LazySupervisedDataset` items into a batch.

    Returns ``input_ids`` ``[B, L]`` right-padded with the tokenizer's pad id, ``labels`` ``[B, L]``
    padded with ``-100``, a boolean ``attention_mask`` ``[B, L]``, and ``images``: the ``pixel_values``
    of the samples that have them, in batch order (``None`` when no sample has any).
    """

    tokenizer: Any

    def __post_init__(self) -> None:
        _pad_token_id(self.tokenizer)

    def __call__(self, instances: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        _check_items(instances)
        longest = max(len(item["input_ids"]) for item in instances)
        input_ids = torch.full((len(instances), longest), self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(instances), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(instances), longest), dtype=torch.bool)
        for b, item in enumerate(instances):
            n = len(item["input_ids"])
            input_ids[b, :n] = item["input_ids"]
            labels[b, :n] = item["labels"]
            attention_mask[b, :n] = True
        images = [item["pixel_values"] for item in instances if item.get("pixel_values") is not None]
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "images": images or None}


@dataclass
class PackedDataCollator:
    """Pack a micro-batch's samples into as few rows of at most ``max_packed_length`` language-model positions as
    :func:`~llava.train.sampling.pack_rows` finds (by each item's ``num_positions``: its text with the fast tokens
    in place of ``<image>``), then pad the rows.

    Returns ``input_ids``, ``labels``, ``attention_mask`` ``[R, L]`` as :class:`DataCollatorForSupervisedDataset`
    (``L`` counts text ids, each ``<image>`` as one), ``packed_sample_ids`` ``[R, L]`` long: ``1..n`` numbering the
    micro-batch's samples in row order, 0 on padding, and ``images`` in the order of their ``<image>`` markers.
    The first label of every sample is ``-100``: in a row nothing before it predicts it, exactly as when the
    sample is alone.
    """

    tokenizer: Any
    max_packed_length: int

    def __post_init__(self) -> None:
        _pad_token_id(self.tokenizer)
        if isinstance(self.max_packed_length, bool) or not isinstance(self.max_packed_length, int) or self.max_packed_length < 1:
            raise ValueError(f"max_packed_length must be a positive integer, got {self.max_packed_length!r}")

    def __call__(self, instances: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        _check_items(instances)
        positions = []
        for b, item in enumerate(instances):
            if "num_positions" not in item:
                raise ValueError(f"batch item {b} has no 'num_positions' (items of LazySupervisedDataset have it)")
            positions.append(int(item["num_positions"]))
        rows = sorted(sorted(row) for row in pack_rows(positions, self.max_packed_length))
        widths = [sum(len(instances[k]["input_ids"]) for k in row) for row in rows]
        shape = (len(rows), max(widths))
        input_ids = torch.full(shape, self.tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.bool)
        sample_ids = torch.zeros(shape, dtype=torch.long)
        images, number = [], 0
        for r, row in enumerate(rows):
            start = 0
            for k in row:
                item = instances[k]
                n, number = len(item["input_ids"]), number + 1
                span = slice(start, start + n)
                input_ids[r, span] = item["input_ids"]
                labels[r, span] = item["labels"]
                labels[r, start] = IGNORE_INDEX
                attention_mask[r, span] = True
                sample_ids[r, span] = number
                markers = int((item["input_ids"] == IMAGE_TOKEN_INDEX).sum())
                if markers and item.get("pixel_values") is None:
                    raise ValueError(f"batch item {k} has an <image> marker but no pixel_values")
                if item.get("pixel_values") is not None:
                    images.append(item["pixel_values"])
                start += n
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "packed_sample_ids": sample_ids,
            "images": images or None,
        }
