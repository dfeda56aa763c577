"""The training set as a sequence over annotation stores: sample ``i`` is materialised only when it is read."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .store import AnnotationStore

__all__ = ["TrainingSamples"]


class TrainingSamples(Sequence):
    """Samples ``0 .. N-1`` drawn from one or more :class:`~llava.train.store.AnnotationStore`.

    ``index`` ``[N]`` int64 (memory-mapped; None: every row of every store once, in order) maps each training
    sample to a row of the stores laid end to end. ``samples[i]`` is a dict (``conversations``, ``video`` or
    ``image``); per-sample numbers come as arrays without materialising any sample (:meth:`per_sample`).
    """

    def __init__(self, stores: Sequence[AnnotationStore], index: np.ndarray | None = None) -> None:
        if not stores:
            raise ValueError("TrainingSamples needs at least one store")
        self.stores = list(stores)
        self.offsets = np.cumsum([0] + [len(store) for store in self.stores])
        self.index = index
        if index is not None and len(index) and not 0 <= int(index.min()) <= int(index.max()) < self.offsets[-1]:
            raise ValueError(f"the index refers to rows outside the {self.offsets[-1]} rows of the stores")
        self._modality: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1]) if self.index is None else len(self.index)

    def locate(self, i: int) -> tuple[int, int]:
        """``(store number, row)`` of sample ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        row = int(self.index[i % n]) if self.index is not None else i % n
        store = int(np.searchsorted(self.offsets, row, side="right")) - 1
        return store, row - int(self.offsets[store])

    def __getitem__(self, i: int) -> dict:  # type: ignore[override]
        store, row = self.locate(i)
        return self.stores[store].sample(row)

    def where(self, i: int) -> str:
        """The annotation file and line (or index) of sample ``i``."""
        store, row = self.locate(i)
        return self.stores[store].where(row)

    def per_sample(self, per_row: Sequence[np.ndarray]) -> np.ndarray:
        """``[N]``: each sample's entry of ``per_row`` (one array over the rows of each store)."""
        flat = per_row[0] if len(per_row) == 1 else np.concatenate([np.asarray(a) for a in per_row])
        return np.asarray(flat) if self.index is None else np.asarray(flat)[self.index]

    @property
    def modality_codes(self) -> np.ndarray:
        """``[N]`` int8 modality code of every sample (``llava.train.store.MODALITY_CODES``)."""
        if self._modality is None:
            self._modality = self.per_sample([store.modality for store in self.stores])
        return self._modality
