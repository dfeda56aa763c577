"""Supervised fine-tuning data: the training set, one sample decoded and tokenised at a time.

A training set is a JSON list (or a JSON Lines file) of samples (:mod:`llava.train.annotations`)::

    {"video": "clips/a.mp4",            # or "image": "pics/b.png", or neither (text only)
     "conversations": [{"from": "human", "value": "<image>\\nWhat happens?"},
                       {"from": "gpt", "value": "A dog runs."}]}

A mixture file (:mod:`llava.train.mixture`) combines several such files, each with its own folders and amount.
The annotations are read once into the annotation store (:mod:`llava.train.store`), memory-mapped and shared by
every process; :class:`LazySupervisedDataset` decodes the media and tokenises one sample at a time (replacing
samples that cannot be loaded) and knows every sample's length without decoding it (:mod:`llava.train.lengths`);
:mod:`llava.train.collators` pads or packs a batch, and :mod:`llava.train.sampling` orders and plans batches.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import expand2square
from llava.model.slow_fast import SlowFastParams, count_visual_tokens
from llava.media_gate import open_image
from llava.video import VideoLoadError, load_video

from .annotations import AnnotationError, load_annotations
from .collators import DataCollatorForSupervisedDataset, PackedDataCollator
from .lengths import SampleLengths, store_text_ids, time_instruction_stand_in
from .mixture import SourceSummary, is_mixture_file, open_mixture
from .samples import TrainingSamples
from .sampling import LengthGroupedSampler, get_length_grouped_indices, get_modality_length_grouped_indices
from .store import MODALITY_CODES, MODALITY_NAMES, open_annotation_store
from .template import (
    DEFAULT_SYSTEM_MESSAGE,
    ChatMLIds,
    SampleError,
    normalize_image_markers,
    preprocess_qwen,
    truncate_to_budget,
    with_time_instruction,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SYSTEM_MESSAGE",
    "AnnotationError",
    "DataArguments",
    "DataCollatorForSupervisedDataset",
    "LazySupervisedDataset",
    "LengthGroupedSampler",
    "PackedDataCollator",
    "SampleError",
    "get_length_grouped_indices",
    "get_modality_length_grouped_indices",
    "load_annotations",
    "load_training_samples",
    "make_supervised_data_module",
    "normalize_image_markers",
    "preprocess_qwen",
    "truncate_to_budget",
]

VIDEO_DECODE_BACKENDS = ("auto", "decord", "pyav")
IMAGE_ASPECT_RATIOS = ("pad", "square", "resize", "original")


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


@dataclass
class DataArguments:
    """Data options of the training command line (parsed by ``transformers.HfArgumentParser``)."""

    data_path: str = field(
        metadata={
            "help": "Training annotations: a JSON list or a JSON Lines (.jsonl) file, or a mixture file (YAML, or "
            "a JSON object with 'sources') listing several annotation files with their own folders and amounts."
        }
    )
    lazy_preprocess: bool = field(
        default=True,
        metadata={"help": "Kept for command-line compatibility: samples are always decoded and tokenised lazily."},
    )
    is_multimodal: bool = field(
        default=True,
        metadata={"help": "Load the samples' videos and images; when false every sample is treated as text only."},
    )
    image_folder: str | None = field(
        default=None,
        metadata={
            "help": "Folder that relative 'image' paths of the annotations are resolved against; also relative "
            "'video' paths when no --video_folder is given (the reference's command lines pass only this one)."
        },
    )
    video_folder: str | None = field(
        default=None,
        metadata={"help": "Folder that relative 'video' paths are resolved against (default: --image_folder)."},
    )
    image_aspect_ratio: str = field(
        default="pad",
        metadata={
            "help": "'pad': pad images to a square with the processor's mean colour before preprocessing; "
            "'square' (or anything else listed): resize/crop directly."
        },
    )
    video_frames: int = field(default=64, metadata={"help": "Most frames sampled from a video."})
    fps: float = field(
        default=4.0,
        metadata={
            "help": "Target sampling rate for videos, capped at video_frames frames; 0 or negative samples "
            "video_frames frames uniformly."
        },
    )
    add_time_instruction: bool = field(
        default=False,
        metadata={
            "help": "Put the clip's duration and frame times at the start of the first human turn, "
            "right after the <image> marker."
        },
    )
    video_decode_backend: str = field(
        default="auto", metadata={"help": "Video decoder: 'auto' (decord, falling back to PyAV), 'decord' or 'pyav'."}
    )
    data_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the annotation store: the annotations read once into memory-mapped Arrow files, "
            "shared by every process of a node, and the samples' lengths (default: $SLOWFAST_DATA_CACHE, else "
            "~/.cache/slowfast-llava/data). Entries are keyed by the files' content: an edited file gets a new one."
        },
    )
    max_consecutive_failures: int = field(
        default=16,
        metadata={
            "help": "Unloadable samples are replaced by the next ones; more than this many failures in a row "
            "stop training with an error."
        },
    )

    def __post_init__(self) -> None:
        if self.video_decode_backend not in VIDEO_DECODE_BACKENDS:
            raise ValueError(
                f"DataArguments.video_decode_backend={self.video_decode_backend!r}: must be one of "
                f"{list(VIDEO_DECODE_BACKENDS)}"
            )
        if self.image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(
                f"DataArguments.image_aspect_ratio={self.image_aspect_ratio!r}: must be one of "
                f"{list(IMAGE_ASPECT_RATIOS)}"
            )
        if isinstance(self.video_frames, bool) or not isinstance(self.video_frames, int) or self.video_frames < 1:
            raise ValueError(f"DataArguments.video_frames={self.video_frames!r}: must be a positive integer")
        if (
            isinstance(self.max_consecutive_failures, bool)
            or not isinstance(self.max_consecutive_failures, int)
            or self.max_consecutive_failures < 0
        ):
            raise ValueError(
                f"DataArguments.max_consecutive_failures={self.max_consecutive_failures!r}: must be an integer >= 0"
            )


def load_training_samples(data_path: str, data_args: DataArguments, seed: int = 0) -> tuple[TrainingSamples, list[Any]]:
    """The training samples of ``data_path``, one annotation file or every source of a mixture file, from the
    annotation store (built on first use under ``data_args.data_cache_dir``).

    Logs the number of samples (per source for a mixture).

    Returns:
        ``(samples, sources)``: the samples (a sequence of dicts with resolved media paths, materialised on
        access), and one :class:`llava.train.mixture.SourceSummary` per source (one for a plain annotation file).

    Raises:
        AnnotationError: see :func:`load_annotations` and :func:`llava.train.mixture.load_mixture`.
    """
    folders = {"video_folder": data_args.video_folder, "image_folder": data_args.image_folder}
    cache_dir = data_args.data_cache_dir
    if is_mixture_file(data_path):
        return open_mixture(data_path, seed=seed, cache_dir=cache_dir, **folders)
    store = open_annotation_store(data_path, cache_dir=cache_dir, **folders)
    samples = TrainingSamples([store])
    logger.info("%d training samples from %s", len(samples), data_path)
    name = os.path.splitext(os.path.basename(os.fspath(data_path)))[0]
    return samples, [SourceSummary(name, os.fspath(data_path), len(samples), len(samples), "all")]


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------

# What a broken sample raises (VideoLoadError, AnnotationError and SampleError are ValueErrors; PIL raises
# OSError subclasses, or DecompressionBombError for absurdly large images). Anything else is a bug.
_LOAD_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


def _processor_image_size(image_processor: Any) -> int:
    """Side of the square the processor outputs (its crop size)."""
    crop = getattr(image_processor, "crop_size", None)
    try:
        height, width = crop["height"], crop["width"]
    except (TypeError, KeyError):
        raise ValueError(f"the image processor has no square crop_size (got {crop!r})") from None
    if height != width or not height:
        raise ValueError(f"the image processor's crop_size must be square, got {height}x{width}")
    return int(height)


def _resolve_max_length(max_length: int | None, model_config: Any, tokenizer: Any) -> int:
    candidates = (
        ("max_length", max_length),
        ("model_config.tokenizer_model_max_length", getattr(model_config, "tokenizer_model_max_length", None)),
        ("tokenizer.model_max_length", getattr(tokenizer, "model_max_length", None)),
    )
    for name, value in candidates:
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if name == "tokenizer.model_max_length" and value > 10**8:  # "no limit" is reported as ~1e30
            continue
        return value
    raise ValueError("no max length: pass max_length or set model_config.tokenizer_model_max_length")


class LazySupervisedDataset(Dataset):
    """Training samples, decoded and tokenised on access.

    ``dataset[i]`` is a dict with

    * ``input_ids`` / ``labels``: ``torch.long`` ``[L]`` (see :func:`preprocess_qwen`), truncated to the
      language model's budget by :func:`truncate_to_budget`;
    * ``pixel_values``: ``float`` ``[T, 3, S, S]`` (``T = 1`` for an image) or ``None`` for text only;
    * ``modality``: ``"video"``, ``"image"`` or ``"text"``;
    * ``index``: the index of the annotation actually used;
    * ``num_positions``: the positions it takes in the language model (``<image>`` replaced by the fast tokens).

    A sample that cannot be loaded (missing or corrupt media, bad conversation, too long) is logged and
    replaced by the next one (``i + 1``, ``i + 2``, ... modulo the length); more than
    ``data_args.max_consecutive_failures`` failures in a row raise ``RuntimeError``. The number of skipped
    samples is kept in shared memory, so it includes those skipped in DataLoader worker processes.
    """

    def __init__(
        self,
        data_path: str,
        tokenizer: Any,
        image_processor: Any,
        data_args: DataArguments,
        model_config: Any,
        max_length: int | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            data_path: annotation file (see :func:`load_annotations`) or mixture file
                (see :mod:`llava.train.mixture`).
            tokenizer: a Qwen2 (ChatML) tokenizer.
            image_processor: CLIP-style processor; its crop size is the frame size ``S``.
            data_args: data options.
            model_config: the model's config; gives the slow/fast pooling (to count fast tokens), the
                tower's image size (checked against the processor) and ``tokenizer_model_max_length``.
            max_length: the language model's budget of positions; defaults to
                ``model_config.tokenizer_model_max_length``, then ``tokenizer.model_max_length``.
            seed: seed of a mixture's draws when the mixture file gives none.
        """
        super().__init__()
        self.data_args = data_args
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.samples, self.sources = load_training_samples(data_path, data_args, seed=seed)
        self.max_length = _resolve_max_length(max_length, model_config, tokenizer)
        self.image_size = _processor_image_size(image_processor)
        output_stride = 32
        if getattr(model_config, "mm_vision_tower", None) is not None:
            from llava.model.vision_tower import TowerSpec

            tower = TowerSpec.from_config(model_config)
            if tower.image_size != self.image_size:
                raise ValueError(
                    f"the image processor crops to {self.image_size} px but the model's vision tower expects "
                    f"{tower.image_size} px (mm_vision_tower_overrides)"
                )
            output_stride = tower.output_stride
        self.grid_size = self.image_size // output_stride
        if self.grid_size < 1:
            raise ValueError(f"image size {self.image_size} is below the tower's stride {output_stride} px: no vision tokens")
        self.slow_fast = SlowFastParams.from_config(model_config)
        self._chatml = ChatMLIds.of(tokenizer)
        self._fast_cache: dict[int, int] = {}
        self._lengths: SampleLengths | None = None
        self.skipped = multiprocessing.Value("q", 0)

    def __len__(self) -> int:
        return len(self.samples)

    # ---- bookkeeping

    def skipped_count(self) -> int:
        """Samples skipped so far, in this process and in DataLoader workers."""
        return int(self.skipped.value)

    def num_fast_tokens(self, num_frames: int) -> int:
        """Fast tokens that replace ``<image>`` for a sample of ``num_frames`` frames."""
        if num_frames not in self._fast_cache:
            self._fast_cache[num_frames] = count_visual_tokens(num_frames, self.grid_size, self.slow_fast)[0]
        return self._fast_cache[num_frames]

    def modality_of(self, index: int) -> str:
        """``"video"``, ``"image"`` or ``"text"`` for sample ``index`` (read from the store, nothing decoded)."""
        if not self.data_args.is_multimodal:
            return "text"
        store, row = self.samples.locate(index)
        return MODALITY_NAMES[int(self.samples.stores[store].modality[row])]

    # ---- lengths, for the samplers

    @property
    def sample_lengths(self) -> SampleLengths:
        """Every sample's positions in the language model and slow tokens (:class:`~llava.train.lengths.SampleLengths`),
        without decoding any media: the text exactly as it will be tokenised, the fast and slow tokens of
        ``video_frames`` frames for a video (an upper bound: a shorter clip gives fewer) and of one frame for an
        image; positions capped at ``max_length``. The text counts are computed once per annotation file and
        tokenizer and kept in the annotation store."""
        if self._lengths is None:
            args = self.data_args
            time_info = time_instruction_stand_in(args.video_frames) if args.add_time_instruction else None
            per_row = [
                store_text_ids(store, self.tokenizer, is_multimodal=args.is_multimodal, time_instruction=time_info)
                for store in self.samples.stores
            ]
            modality = self.samples.modality_codes
            if not args.is_multimodal:
                modality = np.full_like(modality, MODALITY_CODES["text"])
            self._lengths = SampleLengths.compute(
                self.samples.per_sample(per_row), modality, video_frames=args.video_frames, grid_size=self.grid_size,
                slow_fast=self.slow_fast, max_length=self.max_length,
            )
        return self._lengths

    @property
    def modality_lengths(self) -> np.ndarray:
        """Positions per sample (see :attr:`sample_lengths`), positive for visual samples and negative for
        text-only ones, ``[N]`` int64."""
        return self.sample_lengths.signed()

    @property
    def lengths(self) -> np.ndarray:
        """Positions per sample (see :attr:`sample_lengths`), ``[N]`` int64."""
        return self.sample_lengths.positions

    # ---- loading

    def _pixels(self, frames_or_image: Any) -> torch.Tensor:
        return self.image_processor.preprocess(frames_or_image, return_tensors="pt")["pixel_values"]

    def _load_image(self, path: str) -> torch.Tensor:
        """``[1, 3, S, S]`` pixels of one image, padded to a square first with ``image_aspect_ratio="pad"``."""
        if not os.path.exists(path):
            raise SampleError(f"image file '{path}' does not exist")
        # the shared media gate: allowed formats only, size checked from the header before the pixels are decoded
        try:
            with open_image(path) as raw:
                image = raw.convert("RGB")
        except (OSError, VideoLoadError) as err:
            raise SampleError(f"cannot read image '{path}': {err}") from err
        if self.data_args.image_aspect_ratio == "pad":
            fill = tuple(int(x * 255) for x in self.image_processor.image_mean)
            image = expand2square(image, fill)
        return self._pixels(image)

    def _load(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        modality = self.modality_of(index)
        args = self.data_args
        conversations = sample["conversations"]
        pixel_values = None
        if modality == "video":
            fps = args.fps if args.fps > 0 else None
            clip = load_video(sample["video"], args.video_frames, fps=fps, backend=args.video_decode_backend)
            pixel_values = self._pixels(clip.frames)
            if args.add_time_instruction:
                conversations = with_time_instruction(conversations, clip.info())
        elif modality == "image":
            pixel_values = self._load_image(sample["image"])

        input_ids, labels = preprocess_qwen(conversations, self.tokenizer, has_visual=pixel_values is not None)
        num_fast = self.num_fast_tokens(pixel_values.shape[0]) if pixel_values is not None else 0
        input_ids, labels = truncate_to_budget(
            input_ids, labels, self.max_length, num_fast, structural_token_ids=self._chatml.structural
        )
        placeholders = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": pixel_values,
            "modality": modality,
            "index": index,
            "num_positions": len(input_ids) + placeholders * (num_fast - 1),
        }

    def _describe(self, index: int) -> str:
        modality = self.modality_of(index)
        what = "text-only" if modality == "text" else f"{modality} '{self.samples[index][modality]}'"
        return f"{what}, {self.samples.where(index)}"

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        i %= n
        limit = self.data_args.max_consecutive_failures
        failures = 0
        for attempt in range(n):
            index = (i + attempt) % n
            try:
                return self._load(index)
            except _LOAD_ERRORS as err:
                failures += 1
                with self.skipped.get_lock():
                    self.skipped.value += 1
                last_try = failures > limit or attempt == n - 1
                then = "" if last_try else f"; using sample index {(index + 1) % n} instead"
                logger.warning("skipping sample index %d (%s): %s%s", index, self._describe(index), err, then)
                if failures > limit:
                    raise RuntimeError(
                        f"{failures} samples in a row could not be loaded (indices {i} to {index}, modulo {n}), "
                        f"more than max_consecutive_failures={limit}; the last one, index {index} "
                        f"({self._describe(index)}), failed with: {err}"
                    ) from err
                if last_try:
                    raise RuntimeError(f"none of the {n} samples could be loaded; the last error: {err}") from err
        raise AssertionError("unreachable")


def make_supervised_data_module(
    tokenizer: Any,
    image_processor: Any,
    data_args: DataArguments,
    model_config: Any,
    max_length: int | None = None,
    seed: int = 0,
    max_packed_length: int | None = None,
) -> dict[str, Any]:
    """The training set and collator for ``transformers.Trainer``:
    ``{"train_dataset", "eval_dataset": None, "data_collator"}``. ``seed``: a mixture's draws (when its file
    gives none). ``max_packed_length`` (``--packing``): a :class:`PackedDataCollator` packing each micro-batch
    into rows of at most that many positions; otherwise each sample is a row of its own."""
    train_dataset = LazySupervisedDataset(
        data_args.data_path, tokenizer, image_processor, data_args, model_config, max_length=max_length, seed=seed
    )
    if max_packed_length is not None:
        collator = PackedDataCollator(tokenizer=tokenizer, max_packed_length=max_packed_length)
    else:
        collator = DataCollatorForSupervisedDataset(tokenizer=tokenizer)
    return {"train_dataset": train_dataset, "eval_dataset": None, "data_collator": collator}
