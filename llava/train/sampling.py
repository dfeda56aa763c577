"""Orders and batches planned from the samples' lengths.

* :class:`LengthGroupedSampler`: one sample at a time, shuffled so that a step's batches hold samples of similar
  length and (``--group_by_modality_length``) of one modality; the Trainer batches them ``per_device_train_batch_size``
  at a time.
* :class:`PlannedBatchSampler`: whole micro-batches of a variable number of samples, planned from the lengths:
  packed rows of at most ``max_packed_length`` positions (``--packing``), or as many samples as fit a budget of
  padded positions (``--max_tokens_per_batch``).

Every order is drawn from a seed and the epoch alone, so every process draws the same and a resumed run the
order of the epoch it resumes in. Lengths are numpy arrays (a million samples are a few megabytes).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler

logger = logging.getLogger("llava.train.data")

__all__ = [
    "LengthGroupedSampler",
    "PlannedBatchSampler",
    "cut_by_token_budget",
    "get_length_grouped_indices",
    "get_modality_length_grouped_indices",
    "pack_rows",
]

# Samples packed (or cut into budgeted batches) together are drawn from windows of this many shuffled samples:
# large enough to fill rows well, small enough that a row's samples are a random draw of the data.
PLANNING_WINDOW = 4096


# --------------------------------------------------------------------------------------------
# Length-grouped order (one sample at a time)
# --------------------------------------------------------------------------------------------


def _check_grouping_args(lengths: np.ndarray, batch_size: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    zeros = np.flatnonzero(lengths == 0)
    if len(zeros):
        raise ValueError(f"lengths[{zeros[0]}] is 0; lengths must be non-zero (sign = modality)")


def _sorted_megabatches(
    indices: np.ndarray, lengths: np.ndarray, size: int, generator: torch.Generator | None
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle ``indices``, cut them into chunks of ``size`` and sort each chunk by length, longest first (a stable
    sort, as a per-chunk ``sorted`` would). Returns the full chunks ``[n, size]`` and the partial last one."""
    shuffled = indices[torch.randperm(len(indices), generator=generator).numpy()]
    chunk = np.arange(len(shuffled)) // size
    ordered = shuffled[np.lexsort((-np.abs(lengths[shuffled]), chunk))]
    full = len(ordered) // size * size
    return ordered[:full].reshape(-1, size), ordered[full:]


def _length_grouped(lengths: np.ndarray, batch_size: int, world_size: int, generator: torch.Generator | None) -> np.ndarray:
    _check_grouping_args(lengths, batch_size, world_size)
    full, partial = _sorted_megabatches(np.arange(len(lengths)), lengths, batch_size * world_size, generator)
    return np.concatenate([full.ravel(), partial])


def _modality_length_grouped(
    lengths: np.ndarray, batch_size: int, world_size: int, generator: torch.Generator | None
) -> np.ndarray:
    _check_grouping_args(lengths, batch_size, world_size)
    visual, text = np.flatnonzero(lengths > 0), np.flatnonzero(lengths < 0)
    if not len(visual) or not len(text):
        return _length_grouped(lengths, batch_size, world_size, generator)
    size = batch_size * world_size
    (full_visual, partial_visual), (full_text, partial_text) = (
        _sorted_megabatches(group, lengths, size, generator) for group in (visual, text)
    )
    full = np.concatenate([full_visual, full_text])
    order = torch.randperm(len(full), generator=generator).numpy()
    return np.concatenate([full[order].ravel(), partial_visual, partial_text])


def get_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """A permutation of ``range(len(lengths))``: shuffled, then sorted by ``|length|`` (longest first)
    within each mega-batch of ``batch_size * world_size`` consecutive positions."""
    return _length_grouped(np.asarray(lengths), batch_size, world_size, generator).tolist()


def get_modality_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """A permutation of ``range(len(lengths))`` whose mega-batches hold one modality each.

    ``lengths[i] > 0`` marks a visual sample, ``< 0`` a text-only one. Each modality is shuffled and cut
    into mega-batches of ``batch_size * world_size`` (so one optimiser step across all devices), each sorted
    by length, longest first. The full mega-batches are shuffled together; the two partial ones (visual,
    then text-only) come last, so modalities can only meet in those trailing leftovers. With a single
    modality this is :func:`get_length_grouped_indices`.
    """
    return _modality_length_grouped(np.asarray(lengths), batch_size, world_size, generator).tolist()


class LengthGroupedSampler(Sampler[int]):
    """Order samples so that batches hold similar lengths (and, by default, a single modality).

    Every epoch is a fresh permutation covering every index exactly once; see
    :func:`get_modality_length_grouped_indices`. With ``seed``, epoch ``e``'s permutation depends on
    ``seed + e`` only (set by :meth:`set_epoch`), so every process draws the same order and a resumed run
    draws the order of the epoch it resumes in; otherwise it comes from ``generator``, or torch's global RNG.
    """

    def __init__(
        self,
        batch_size: int,
        world_size: int,
        lengths: Sequence[int] | np.ndarray | None = None,
        group_by_modality: bool = True,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        """
        Args:
            batch_size: samples per device per step.
            world_size: number of devices.
            lengths: per-sample lengths; with ``group_by_modality`` signed (visual > 0, text-only < 0),
                e.g. ``dataset.modality_lengths``.
            group_by_modality: keep visual and text-only samples in separate mega-batches.
            generator: source of randomness when no ``seed`` is given.
            seed: draw epoch ``e`` from a generator seeded with ``seed + e``.
        """
        if lengths is None:
            raise ValueError("LengthGroupedSampler needs lengths (e.g. dataset.modality_lengths)")
        if seed is not None and generator is not None:
            raise ValueError("LengthGroupedSampler takes a seed or a generator, not both")
        self.lengths = np.asarray(lengths)
        if not np.issubdtype(self.lengths.dtype, np.integer):
            self.lengths = self.lengths.astype(np.int64)
        _check_grouping_args(self.lengths, batch_size, world_size)
        self.batch_size = batch_size
        self.world_size = world_size
        self.group_by_modality = group_by_modality
        self.generator = generator
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the next iteration's order for ``epoch`` (with a ``seed``)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        grouping = _modality_length_grouped if self.group_by_modality else _length_grouped
        generator = self.generator
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = grouping(self.lengths, self.batch_size, self.world_size, generator)
        return (int(i) for i in order)  # one index at a time: no list of a million Python ints


# --------------------------------------------------------------------------------------------
# Planned micro-batches (packing, token budget)
# --------------------------------------------------------------------------------------------


def pack_rows(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: positions ``0..n-1`` (of ``lengths``) into rows whose lengths sum to at most
    ``capacity``, each sample in the fullest row it still fits, longest first.

    Raises:
        ValueError: a length above ``capacity``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    too_long = np.flatnonzero(lengths > capacity)
    if len(too_long):
        k = int(too_long[0])
        raise ValueError(f"a sample of {lengths[k]} positions does not fit a packed row of {capacity}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for k in np.argsort(-lengths, kind="stable").tolist():
        need = int(lengths[k])
        slot = bisect.bisect_left(free, (need, -1))
        if slot < len(free):
            room, row = free.pop(slot)
            rows[row].append(k)
        else:
            room, row = capacity, len(rows)
            rows.append([k])
        if room - need > 0:
            bisect.insort(free, (room - need, row))
    return rows


def cut_by_token_budget(lengths: Sequence[int] | np.ndarray, budget: int) -> list[list[int]]:
    """Positions ``0..n-1`` sorted longest first and cut into batches whose padded size (samples x longest)
    stays within ``budget``; a sample longer than ``budget`` gets a batch of its own."""
    lengths = np.asarray(lengths, dtype=np.int64)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for k in np.argsort(-lengths, kind="stable").tolist():
        need = int(lengths[k])
        if current and max(longest, need) * (len(current) + 1) > budget:
            batches.append(current)
            current, longest = [], 0
        current.append(k)
        longest = max(longest, need)
    if current:
        batches.append(current)
    return batches


@dataclass(frozen=True)
class PlanStats:
    """What a plan makes of the data: micro-batches, samples and positions (padded and real)."""

    micro_batches: int
    samples: int
    real_positions: int
    padded_positions: int

    @property
    def fill(self) -> float:
        return self.real_positions / max(self.padded_positions, 1)

    def describe(self) -> str:
        return (
            f"{self.micro_batches} micro-batches of {self.samples / max(self.micro_batches, 1):.2f} samples on average, "
            f"{100 * self.fill:.1f} % of their positions real ({100 * (1 - self.fill):.1f} % padding) by the planned lengths"
        )


class PlannedBatchSampler(Sampler[list[int]]):
    """Micro-batches of a variable number of samples, planned from their lengths.

    ``max_packed_length`` (packing): the samples of each window of shuffled samples are packed into rows of at
    most ``max_packed_length`` positions (:func:`pack_rows`), and ``rows_per_batch`` rows make a micro-batch.
    ``max_tokens_per_batch`` (no packing): each window is sorted by length and cut into micro-batches whose padded
    size stays within the budget (:func:`cut_by_token_budget`).

    Which samples share a micro-batch is drawn once from ``seed``; each epoch then draws the order of the
    micro-batches from ``seed`` and the epoch, so every epoch has the same number of micro-batches (the Trainer
    counts its steps from the first) and visits every sample once. With ``visual`` (a modality per sample, for
    ``--group_by_modality_length``), a micro-batch holds one modality and each run of ``batches_per_step``
    micro-batches (one optimiser step on every device) too; the steps that cannot be filled come last.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        *,
        seed: int,
        max_packed_length: int | None = None,
        rows_per_batch: int = 1,
        max_tokens_per_batch: int | None = None,
        visual: Sequence[bool] | np.ndarray | None = None,
        batches_per_step: int = 1,
        window: int = PLANNING_WINDOW,
    ) -> None:
        if (max_packed_length is None) == (max_tokens_per_batch is None):
            raise ValueError("PlannedBatchSampler plans packed rows (max_packed_length) or a token budget (max_tokens_per_batch)")
        for name, value in (("max_packed_length", max_packed_length), ("max_tokens_per_batch", max_tokens_per_batch),
                            ("rows_per_batch", rows_per_batch), ("batches_per_step", batches_per_step), ("window", window)):
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) == 0:
            raise ValueError("no samples to plan")
        if (self.lengths < 1).any():
            raise ValueError(f"lengths must be positive, got {int(self.lengths.min())}")
        self.seed = seed
        self.epoch = 0
        self.batches_per_step = batches_per_step
        self.packed = max_packed_length is not None
        groups = [np.arange(len(self.lengths))]
        if visual is not None:
            visual = np.asarray(visual, dtype=bool)
            groups = [g for g in (np.flatnonzero(visual), np.flatnonzero(~visual)) if len(g)]
        rng = np.random.default_rng([seed, 0])
        self.groups: list[list[list[int]]] = []  # per modality group, its micro-batches
        real = padded = 0
        for group in groups:
            batches = []
            shuffled = group[rng.permutation(len(group))]
            for start in range(0, len(shuffled), window):
                part = shuffled[start : start + window]
                if self.packed:
                    rows = [part[r].tolist() for r in pack_rows(self.lengths[part], max_packed_length)]
                    rows = [rows[k] for k in rng.permutation(len(rows))]
                    batches += [sum(rows[k : k + rows_per_batch], []) for k in range(0, len(rows), rows_per_batch)]
                    padded += len(rows) * max_packed_length
                else:
                    cut = [part[b].tolist() for b in cut_by_token_budget(self.lengths[part], max_tokens_per_batch)]
                    batches += cut
                    padded += sum(len(b) * int(self.lengths[b].max()) for b in cut)
            self.groups.append(batches)
            real += int(self.lengths[group].sum())
        self.stats = PlanStats(sum(len(b) for b in self.groups), len(self.lengths), real, padded)

    def set_epoch(self, epoch: int) -> None:
        """Draw the next iteration's order for ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.stats.micro_batches

    def __iter__(self):
        rng = np.random.default_rng([self.seed, 1, self.epoch])
        if len(self.groups) == 1:
            batches = self.groups[0]
            return iter([batches[k] for k in rng.permutation(len(batches))])
        size = self.batches_per_step
        full, partial = [], []
        for batches in self.groups:
            shuffled = [batches[k] for k in rng.permutation(len(batches))]
            for start in range(0, len(shuffled), size):
                step = shuffled[start : start + size]
                (full if len(step) == size else partial).append(step)
        order = rng.permutation(len(full))
        return iter([batch for k in order for batch in full[k]] + [batch for step in partial for batch in step])
