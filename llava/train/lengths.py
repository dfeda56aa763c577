"""Every sample's length without decoding a video: text ids from the tokenizer, visual tokens from the config.

The text of a sample is counted exactly as :func:`llava.train.template.preprocess_qwen` will tokenise it (the
same rendering, one batched tokenizer call per chunk of rows, keeping only the counts), once per annotation store
and tokenizer, and saved next to the store (``text_ids-<key>.npy``, memory-mapped by every process). The visual
tokens follow from the configuration alone: a video is counted with the most frames it can be sampled with
(``video_frames``; a shorter clip gives fewer), an image as one frame, through
:func:`llava.model.slow_fast.count_visual_tokens`, the model's own pooling rules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from llava.model.slow_fast import SlowFastParams, count_visual_tokens

from .store import MODALITY_CODES, AnnotationStore, publish, read_manifest, store_key, write_manifest
from .template import DEFAULT_SYSTEM_MESSAGE, count_prompt_ids

logger = logging.getLogger("llava.train.data")

__all__ = ["SampleLengths", "store_text_ids", "time_instruction_stand_in", "tokenizer_fingerprint"]

LENGTHS_FORMAT = 1
_CHUNK_ROWS = 4096


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides how ``tokenizer`` splits text (its serialised fast tokenizer: vocabulary,
    merges, normaliser, pre-tokeniser, added tokens), or of its vocabulary for a slow one."""
    digest = hashlib.blake2b(type(tokenizer).__name__.encode(), digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        digest.update(json.dumps(sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))).encode())
    return digest.hexdigest()


def time_instruction_stand_in(video_frames: int) -> str:
    """What ``add_time_instruction`` writes for a 100-second video sampled at ``video_frames`` frames (the real
    text depends on each clip's duration and frame times, so lengths with it are estimates)."""
    from llava.video import VideoClip

    seconds = 100.0
    indices = [round(i * (seconds - 1) / max(video_frames - 1, 1)) for i in range(video_frames)]
    clip = VideoClip(np.zeros((0, 1, 1, 3), np.uint8), indices, 1.0, int(seconds), seconds, "estimate", "")
    return clip.info()


def store_text_ids(
    store: AnnotationStore, tokenizer: Any, *, is_multimodal: bool = True, time_instruction: str | None = None
) -> np.ndarray:
    """``[rows]`` int32: how many ids each row's prompt has (``<image>`` as one), memory-mapped from the store's
    folder; computed on first use, by one process per host (the others wait), in chunks of rows.

    ``is_multimodal=False`` counts visual samples as text (markers removed), as the dataset then treats them.
    """
    key = store_key(
        "text_ids", LENGTHS_FORMAT, tokenizer_fingerprint(tokenizer), DEFAULT_SYSTEM_MESSAGE, is_multimodal, time_instruction
    )
    final = os.path.join(store.folder + ".lengths", f"text_ids-{key}")

    def build(tmp: str) -> None:
        os.makedirs(tmp)
        started = time.monotonic()
        rows = len(store)
        counts = np.lib.format.open_memmap(os.path.join(tmp, "text_ids.npy"), mode="w+", dtype=np.int32, shape=(rows,))
        for start in range(0, rows, _CHUNK_ROWS):
            stop = min(start + _CHUNK_ROWS, rows)
            visual = (np.asarray(store.modality[start:stop]) != MODALITY_CODES["text"]) & is_multimodal
            counts[start:stop] = count_prompt_ids(store.conversations(start, stop), visual.tolist(), tokenizer, time_instruction)
        counts.flush()
        del counts
        write_manifest(tmp, dict(store=store.folder, rows=rows, seconds=round(time.monotonic() - started, 2)))

    if read_manifest(final) is None:
        started = time.monotonic()
        publish(final, build, f"text lengths of {store.annotation}")
        logger.info("text lengths of %s: %d samples (%.1f s)", store.annotation, len(store), time.monotonic() - started)
    counts = np.load(os.path.join(final, "text_ids.npy"), mmap_mode="r")
    if len(counts) != len(store):
        raise ValueError(f"{final}: {len(counts)} lengths for {len(store)} rows")
    return counts


@dataclass(frozen=True)
class SampleLengths:
    """Per-sample lengths of a training set, ``[N]`` arrays (int32, bool).

    ``positions``: what the sample takes in the language model (text ids, with ``<image>`` replaced by the fast
    tokens), capped at ``max_length`` as truncation will; ``slow``: its slow tokens (0 for text only);
    ``visual``: whether it carries a video or an image.
    """

    positions: np.ndarray
    slow: np.ndarray
    visual: np.ndarray

    @classmethod
    def compute(
        cls,
        text_ids: np.ndarray,
        modality: np.ndarray,
        *,
        video_frames: int,
        grid_size: int,
        slow_fast: SlowFastParams,
        max_length: int,
    ) -> "SampleLengths":
        """From the text ids (``<image>`` counted as one) and modality codes (``MODALITY_CODES``) per sample."""
        fast = np.zeros(len(MODALITY_CODES), dtype=np.int64)
        slow = np.zeros(len(MODALITY_CODES), dtype=np.int64)
        for name, frames in (("image", 1), ("video", video_frames)):
            fast[MODALITY_CODES[name]], slow[MODALITY_CODES[name]] = count_visual_tokens(frames, grid_size, slow_fast)
        codes = np.asarray(modality, dtype=np.int64)
        visual = codes != MODALITY_CODES["text"]
        positions = np.asarray(text_ids, dtype=np.int64) + np.where(visual, fast[codes] - 1, 0)
        # int32: a million samples are 4 MB an array in every rank
        return cls(np.minimum(positions, max_length).astype(np.int32), slow[codes].astype(np.int32), visual)

    def signed(self) -> np.ndarray:
        """``positions``, negative for text-only samples (the length-grouped sampler's convention)."""
        return np.where(self.visual, self.positions, -self.positions)
