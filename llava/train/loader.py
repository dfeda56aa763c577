"""The training DataLoader when batches are planned from the lengths (``--packing``, ``--max_tokens_per_batch``),
and what keeps DataLoader workers from copying the parent's memory."""

from __future__ import annotations

import gc
import logging
from functools import partial
from typing import Any

from torch.utils.data import DataLoader

from .sampling import PlannedBatchSampler

logger = logging.getLogger("llava.train.data")

__all__ = ["freeze_before_fork", "planned_batch_sampler", "planned_dataloader"]


def planned_batch_sampler(dataset: Any, args: Any) -> PlannedBatchSampler | None:
    """The batch sampler ``args`` ask for, or None for the Trainer's own (one sample at a time).

    ``--packing``: rows of at most ``--max_packed_length`` positions, ``--per_device_train_batch_size`` rows a
    micro-batch (``--max_tokens_per_batch // --max_packed_length`` rows when a budget is given).
    ``--max_tokens_per_batch`` alone: as many samples as fit the budget, padding included.
    ``--group_by_modality_length`` keeps every optimiser step's micro-batches (on every device) to one modality.
    """
    packing = bool(getattr(args, "packing", False))
    budget = getattr(args, "max_tokens_per_batch", None)
    if not packing and budget is None:
        return None
    if not hasattr(dataset, "sample_lengths"):
        raise ValueError("--packing and --max_tokens_per_batch need a dataset that knows its samples' lengths")
    lengths = dataset.sample_lengths
    seed = args.data_seed if args.data_seed is not None else args.seed
    visual = lengths.visual if args.group_by_modality_length else None
    steps = args.world_size * args.gradient_accumulation_steps
    if packing:
        rows = budget // args.max_packed_length if budget is not None else args.per_device_train_batch_size
        sampler = PlannedBatchSampler(
            lengths.positions, seed=seed, max_packed_length=args.max_packed_length, rows_per_batch=rows,
            visual=visual, batches_per_step=steps,
        )
        what = f"packed rows of at most {args.max_packed_length} positions, {rows} a micro-batch"
    else:
        sampler = PlannedBatchSampler(
            lengths.positions, seed=seed, max_tokens_per_batch=budget, visual=visual, batches_per_step=steps
        )
        what = f"micro-batches of at most {budget} padded positions"
    logger.info("training batches: %s; %s", what, sampler.stats.describe())
    return sampler


def freeze_before_fork() -> None:
    """Move every object alive now out of the garbage collector's reach before DataLoader workers are forked: a
    collection in a worker would otherwise write to the header of every object it inherited, and each written
    page becomes the worker's own copy (``gc.freeze``, as Python's documentation advises before ``fork``)."""
    gc.collect()
    gc.freeze()


def planned_dataloader(dataset: Any, batch_sampler: PlannedBatchSampler, collate_fn: Any, args: Any) -> DataLoader:
    """A DataLoader over ``batch_sampler``'s micro-batches with the Trainer's worker settings."""
    from transformers.trainer_utils import seed_worker

    params: dict[str, Any] = dict(
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
        persistent_workers=args.dataloader_persistent_workers if args.dataloader_num_workers else False,
        worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers, rank=args.process_index),
    )
    if args.dataloader_num_workers:
        params["prefetch_factor"] = args.dataloader_prefetch_factor
        if getattr(args, "dataloader_multiprocessing_context", None):
            params["multiprocessing_context"] = args.dataloader_multiprocessing_context
    return DataLoader(dataset, **params)
