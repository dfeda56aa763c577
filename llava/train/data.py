"""Supervised fine-tuning data: annotations, chat templating, label masking, truncation and batching.

A training set is a JSON list (or a JSON Lines file) of samples::

    {"video": "clips/a.mp4",            # or "image": "pics/b.png", or neither (text only)
     "conversations": [{"from": "human", "value": "<image>\\nWhat happens?"},
                       {"from": "gpt", "value": "A dog runs."}]}

A mixture file (:mod:`llava.train.mixture`) combines several such files, each with its own folders and amount.
:func:`load_annotations` validates every sample when training starts, :class:`LazySupervisedDataset`
decodes the media and tokenises one sample at a time (replacing samples that cannot be loaded),
:class:`DataCollatorForSupervisedDataset` pads a batch, and :class:`LengthGroupedSampler` orders the
samples so that a batch holds samples of similar length and of one modality.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import expand2square, tokenizer_image_token
from llava.model.slow_fast import SlowFastParams, count_visual_tokens
from llava.video import load_video

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SYSTEM_MESSAGE",
    "AnnotationError",
    "DataArguments",
    "DataCollatorForSupervisedDataset",
    "LazySupervisedDataset",
    "LengthGroupedSampler",
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

DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Annotation speaker -> ChatML role.
ROLE_NAMES: dict[str, str] = {"system": "system", "human": "user", "gpt": "assistant"}
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


# --------------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------------


class AnnotationError(ValueError):
    """The annotation file cannot be parsed, or one of its samples is malformed (the message says where)."""


def _conversation_problem(conversations: Any) -> str | None:
    """Describe what is wrong with a ``conversations`` list (``"field: why"``), or return ``None``."""
    if not isinstance(conversations, list):
        return f"conversations: must be a list of turns, got {type(conversations).__name__}"
    if not conversations:
        return "conversations: must not be empty"
    for k, turn in enumerate(conversations):
        where = f"conversations[{k}]"
        if not isinstance(turn, dict):
            return f"{where}: a turn must be an object with 'from' and 'value', got {type(turn).__name__}"
        if "from" not in turn:
            return f"{where}.from: missing"
        if turn["from"] not in ROLE_NAMES:
            return f"{where}.from: must be one of {list(ROLE_NAMES)}, got {turn['from']!r}"
        if "value" not in turn:
            return f"{where}.value: missing"
        if not isinstance(turn["value"], str):
            return f"{where}.value: must be a string, got {type(turn['value']).__name__}"

    start = 1 if conversations[0]["from"] == "system" else 0
    if start == len(conversations):
        return "conversations: has a system turn but no human/gpt turns"
    for k in range(start, len(conversations)):
        expected = "human" if (k - start) % 2 == 0 else "gpt"
        speaker = conversations[k]["from"]
        if speaker != expected:
            why = "only the first turn may be 'system'" if speaker == "system" else "turns must alternate human/gpt"
            return f"conversations[{k}].from: expected {expected!r} ({why}), got {speaker!r}"
    if conversations[-1]["from"] != "gpt":
        return f"conversations[{len(conversations) - 1}].from: the last turn must be 'gpt' (an answer to learn)"
    return None


def _sample_problem(sample: Any) -> str | None:
    """Describe what is wrong with one annotation sample (``"field: why"``), or return ``None``."""
    if not isinstance(sample, dict):
        return f"a sample must be a JSON object, got {type(sample).__name__}"
    if "conversations" not in sample:
        return "conversations: missing"
    problem = _conversation_problem(sample["conversations"])
    if problem:
        return problem
    media = [key for key in ("video", "image") if sample.get(key) is not None]
    if len(media) == 2:
        return "video/image: a sample has one image or one video, not both"
    if media:
        key = media[0]
        if not isinstance(sample[key], str) or not sample[key]:
            return f"{key}: must be a non-empty string path, got {sample[key]!r}"
        markers = sum(turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in sample["conversations"])
        if markers > 1:
            return f"conversations: {markers} {DEFAULT_IMAGE_TOKEN} markers, but a sample carries one {key}"
    return None


def _parse_json_list(text: str, path: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(data, list):
        raise AnnotationError(f"{path}: the top level must be a list of samples, got {type(data).__name__}")
    return [(f"index {i}", sample) for i, sample in enumerate(data)]


def _parse_json_lines(text: str, path: str) -> list[tuple[str, Any]]:
    records = []
    # Split on "\n" only: str.splitlines would also break at U+2028 etc., which JSON allows inside strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path}: invalid JSON at line {lineno}, column {err.colno}: {err.msg}") from None
    return records


def load_annotations(
    path: str | os.PathLike[str],
    *,
    video_folder: str | None = None,
    image_folder: str | None = None,
) -> list[dict]:
    """Read and validate a training annotation file.

    The file is JSON Lines when its name ends in ``.jsonl`` or its content starts with ``{``; otherwise it
    must hold a JSON list. Every sample is checked: an object with ``conversations``, a non-empty list of
    ``{"from": "human"|"gpt"|"system", "value": str}`` turns alternating human/gpt (an optional leading
    system turn, a final gpt turn), and at most one of ``video`` / ``image`` (a string path; a visual sample
    has at most one ``<image>`` marker). Relative ``image`` paths are joined to ``image_folder`` and relative
    ``video`` paths to ``video_folder``, or to ``image_folder`` when no ``video_folder`` is given (the
    reference resolves both against its ``--image_folder``).

    Returns:
        The samples, as dicts, with resolved media paths.

    Raises:
        AnnotationError: the file cannot be read or parsed (the message gives the line and column), holds
            no samples, or a sample is malformed (the message names ``index N`` for a JSON list or
            ``line N`` for JSON Lines, and the field at fault).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except OSError as err:
        raise AnnotationError(f"cannot read annotation file '{path}': {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None

    stripped = text.lstrip()
    if not stripped:
        raise AnnotationError(f"{path}: the file is empty; expected a JSON list or JSON Lines of samples")
    if path.lower().endswith(".jsonl") or stripped.startswith("{"):
        records = _parse_json_lines(text, path)
    elif stripped.startswith("["):
        records = _parse_json_list(text, path)
    else:
        raise AnnotationError(f"{path}: expected a JSON list ('[...]') or JSON Lines (one object per line)")
    if not records:
        raise AnnotationError(f"{path}: contains no samples")

    folders = {"video": video_folder or image_folder, "image": image_folder}
    samples = []
    for where, sample in records:
        problem = _sample_problem(sample)
        if problem:
            raise AnnotationError(f"{path}: {where}: {problem}")
        for key, folder in folders.items():
            if sample.get(key) is None:
                sample.pop(key, None)
            elif folder and not os.path.isabs(sample[key]):
                sample[key] = os.path.join(folder, sample[key])
        samples.append(sample)
    return samples


def load_training_samples(data_path: str, data_args: DataArguments, seed: int = 0) -> tuple[list[dict], list[Any]]:
    """The training samples of ``data_path``: one annotation file, or every source of a mixture file.

    Logs the number of samples (per source for a mixture).

    Returns:
        ``(samples, sources)``: the samples with resolved media paths, and one
        :class:`llava.train.mixture.SourceSummary` per source (one for a plain annotation file).

    Raises:
        AnnotationError: see :func:`load_annotations` and :func:`llava.train.mixture.load_mixture`.
    """
    from .mixture import SourceSummary, is_mixture_file, load_mixture

    folders = {"video_folder": data_args.video_folder, "image_folder": data_args.image_folder}
    if is_mixture_file(data_path):
        return load_mixture(data_path, seed=seed, **folders)
    samples = load_annotations(data_path, **folders)
    logger.info("%d training samples from %s", len(samples), data_path)
    name = os.path.splitext(os.path.basename(os.fspath(data_path)))[0]
    return samples, [SourceSummary(name, os.fspath(data_path), len(samples), len(samples), "all")]


# --------------------------------------------------------------------------------------------
# Chat template (qwen_1_5) and labels
# --------------------------------------------------------------------------------------------

_MARKER_WITH_NEWLINES = re.compile(r"\n*" + re.escape(DEFAULT_IMAGE_TOKEN) + r"\n*")


def _remove_markers(value: str) -> str:
    """Drop every ``<image>`` marker with the newlines around it, then strip the ends.

    A marker that stood on its own line between two pieces of text leaves one newline behind.
    """
    return _MARKER_WITH_NEWLINES.sub(lambda m: "\n" if "\n" in m.group() else "", value).strip()


def normalize_image_markers(conversations: Sequence[Mapping[str, str]], has_visual: bool) -> list[dict[str, str]]:
    """Return a copy of ``conversations`` with the ``<image>`` marker where the model expects it.

    With ``has_visual`` the turn holding the marker becomes ``"<image>\\n" + rest`` (the marker and its
    surrounding newlines removed from where it stood); if no turn has one, the first human turn gets it.
    Without ``has_visual`` every marker is removed.

    Raises:
        ValueError: with ``has_visual``, more than one marker, or no human turn to put it in.
    """
    turns = [dict(turn) for turn in conversations]
    marked = [k for k, turn in enumerate(turns) if DEFAULT_IMAGE_TOKEN in turn["value"]]
    if not has_visual:
        for k in marked:
            turns[k]["value"] = _remove_markers(turns[k]["value"])
        return turns

    count = sum(turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in turns)
    if count > 1:
        raise ValueError(
            f"the conversation has {count} {DEFAULT_IMAGE_TOKEN} markers; a sample carries one visual input"
        )
    if marked:
        target = marked[0]
    else:
        humans = [k for k, turn in enumerate(turns) if turn["from"] == "human"]
        if not humans:
            raise ValueError(f"the conversation has no human turn to hold the {DEFAULT_IMAGE_TOKEN} marker")
        target = humans[0]
    turns[target]["value"] = f"{DEFAULT_IMAGE_TOKEN}\n{_remove_markers(turns[target]['value'])}"
    return turns


def _with_time_instruction(conversations: Sequence[Mapping[str, str]], info: str) -> list[dict[str, str]]:
    """Insert ``info`` at the start of the first human turn, just after its leading ``<image>\\n``."""
    turns = normalize_image_markers(conversations, has_visual=True)
    first = next(k for k, turn in enumerate(turns) if turn["from"] == "human")
    value = turns[first]["value"]
    head = f"{DEFAULT_IMAGE_TOKEN}\n"
    if value.startswith(head):
        rest = value[len(head) :]
        turns[first]["value"] = f"{head}{info}\n{rest}" if rest else f"{head}{info}"
    else:
        turns[first]["value"] = f"{info}\n{value}"
    return turns


@dataclass(frozen=True)
class _ChatMLIds:
    """Ids of the ChatML structure tokens of one tokenizer."""

    im_start: int
    im_end: int
    newline: int
    bos_prefix: tuple[int, ...]  # what tokenizer_image_token puts before every encoding (empty for Qwen2)

    @property
    def structural(self) -> frozenset[int]:
        return frozenset((self.im_start, self.im_end, self.newline))

    @classmethod
    def of(cls, tokenizer: Any) -> "_ChatMLIds":
        ids = {}
        for name, text in (("im_start", IM_START), ("im_end", IM_END), ("newline", "\n")):
            encoded = tokenizer(text, add_special_tokens=False).input_ids
            if len(encoded) != 1:
                raise ValueError(
                    f"the tokenizer encodes {text!r} as {len(encoded)} tokens {encoded}; the qwen_1_5 template "
                    "needs a Qwen2 (ChatML) tokenizer where it is a single token"
                )
            ids[name] = encoded[0]
        return cls(bos_prefix=tuple(tokenizer_image_token("", tokenizer)), **ids)

    def encode(self, text: str, tokenizer: Any) -> list[int]:
        """Token ids of ``text`` (``<image>`` as ``-200``), without the tokenizer's BOS."""
        return tokenizer_image_token(text, tokenizer)[len(self.bos_prefix) :]


def preprocess_qwen(
    conversations: Sequence[Mapping[str, str]],
    tokenizer: Any,
    has_visual: bool,
    system_message: str = DEFAULT_SYSTEM_MESSAGE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render a conversation with the ``qwen_1_5`` template, tokenise it and build its labels.

    The prompt is ``<|im_start|>system\\n{system}<|im_end|>\\n`` followed by
    ``<|im_start|>{user|assistant}\\n{value}<|im_end|>\\n`` for each turn; a leading ``system`` turn
    replaces ``system_message``. ``<image>`` markers are first placed by :func:`normalize_image_markers`
    and become the single id ``-200``.

    Each turn is tokenised on its own. Since every turn starts with the special token ``<|im_start|>``,
    which the tokenizer never merges with its neighbours, the concatenation equals the tokenisation of
    the whole prompt.

    Labels: in system and user turns only ``<|im_start|>``, ``<|im_end|>`` and ``\\n`` tokens are
    supervised; in assistant turns every token is, except the role name; ``-200`` never is.

    Returns:
        ``input_ids`` and ``labels``, both ``torch.long`` ``[L]``.

    Raises:
        ValueError: malformed conversation, misplaced markers, or a tokenizer without ChatML tokens.
    """
    problem = _conversation_problem(list(conversations))
    if problem:
        raise ValueError(f"invalid conversation: {problem}")
    turns = normalize_image_markers(conversations, has_visual)
    if turns[0]["from"] == "system":
        system_message = turns[0]["value"]
        turns = turns[1:]
    ids = _ChatMLIds.of(tokenizer)

    input_ids: list[int] = []
    labels: list[int] = []
    for role, content in [("system", system_message)] + [(ROLE_NAMES[t["from"]], t["value"]) for t in turns]:
        turn_ids = ids.encode(f"{IM_START}{role}\n{content}{IM_END}\n", tokenizer)
        if role == "assistant":
            header = ids.encode(f"{IM_START}{role}", tokenizer)
            if turn_ids[: len(header)] != header:
                raise ValueError(f"the tokenizer merges the role name {role!r} with the text after it")
            turn_labels = list(turn_ids)
            turn_labels[1 : len(header)] = [IGNORE_INDEX] * (len(header) - 1)
        else:
            turn_labels = [t if t in ids.structural else IGNORE_INDEX for t in turn_ids]
        input_ids += turn_ids
        labels += turn_labels

    labels = [IGNORE_INDEX if t == IMAGE_TOKEN_INDEX else label for t, label in zip(input_ids, labels)]
    return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------------


class SampleError(ValueError):
    """One sample cannot be used for training (it is skipped and replaced by another)."""


def truncate_to_budget(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    max_length: int,
    num_fast_tokens: int,
    *,
    structural_token_ids: Collection[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut text from the end so that the language model sees at most ``max_length`` positions.

    Each ``-200`` placeholder in ``input_ids`` ``[L]`` becomes ``num_fast_tokens`` positions, so a visual
    sample takes ``L - 1 + num_fast_tokens`` positions; a text-only sample takes ``L``.

    Args:
        input_ids, labels: ``[L]`` tensors of one sample.
        max_length: the language model's budget of positions.
        num_fast_tokens: fast tokens replacing each placeholder.
        structural_token_ids: ids that do not count as supervision when checking that something is left
            to learn (pass the ChatML ``<|im_start|>``, ``<|im_end|>`` and ``\\n`` ids, which are
            supervised everywhere, to require that some of the answer survives).

    Returns:
        ``(input_ids, labels)``, unchanged if they fit, else their first ``n`` entries.

    Raises:
        SampleError: the budget cannot hold everything up to and including the last placeholder, or no
            supervised label is left after the cut.
        ValueError: bad arguments.
    """
    if input_ids.dim() != 1 or labels.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and labels must be 1-D of equal length, got {tuple(input_ids.shape)} and {tuple(labels.shape)}"
        )
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if num_fast_tokens < 0:
        raise ValueError(f"num_fast_tokens must be >= 0, got {num_fast_tokens}")

    placeholders = (input_ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
    extra = len(placeholders) * (num_fast_tokens - 1)
    needed = len(input_ids) + extra
    if needed <= max_length:
        return input_ids, labels

    keep = max_length - extra
    if len(placeholders) and keep < int(placeholders[-1]) + 1:
        raise SampleError(
            f"the sample needs {needed} positions ({len(input_ids)} text ids with {len(placeholders)} visual "
            f"placeholder(s) of {num_fast_tokens} fast tokens) but max_length is {max_length}, which cannot "
            f"hold the text up to the visual placeholder at position {int(placeholders[-1])}"
        )
    input_ids, labels = input_ids[:keep], labels[:keep]
    supervised = labels != IGNORE_INDEX
    if structural_token_ids:
        supervised &= ~torch.isin(labels, torch.tensor(sorted(structural_token_ids), dtype=labels.dtype))
    if not bool(supervised.any()):
        raise SampleError(
            f"the sample needs {needed} positions but max_length is {max_length}; after cutting it to "
            f"{keep} ids no supervised label is left"
        )
    return input_ids, labels


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
    * ``index``: the index of the annotation actually used.

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
        self._chatml = _ChatMLIds.of(tokenizer)
        self._fast_cache: dict[int, int] = {}
        self._modality_lengths: list[int] | None = None
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
        """``"video"``, ``"image"`` or ``"text"`` for sample ``index``."""
        sample = self.samples[index]
        if self.data_args.is_multimodal:
            for key in ("video", "image"):
                if key in sample:
                    return key
        return "text"

    # ---- lengths for length-grouped sampling

    @property
    def modality_lengths(self) -> list[int]:
        """Estimated positions per sample, positive for visual samples and negative for text-only ones.

        Text token count plus template tokens, plus the fast tokens of ``video_frames`` frames (one frame
        for images); no media is decoded. Capped at ``max_length``.
        """
        if self._modality_lengths is None:
            self._modality_lengths = self._estimate_lengths()
        return self._modality_lengths

    @property
    def lengths(self) -> list[int]:
        """Estimated positions per sample (see :attr:`modality_lengths`), all positive."""
        return [abs(n) for n in self.modality_lengths]

    def _estimate_lengths(self) -> list[int]:
        values = [
            _remove_markers(t["value"]) if DEFAULT_IMAGE_TOKEN in t["value"] else t["value"]
            for s in self.samples
            for t in s["conversations"]
        ]
        value_counts = iter(len(ids) for ids in self.tokenizer(values, add_special_tokens=False)["input_ids"])
        text_counts = [sum(next(value_counts) for _ in s["conversations"]) for s in self.samples]
        # "<|im_start|>{role}\n" ... "<|im_end|>\n" around every turn.
        overhead = {
            role: len(self._chatml.encode(f"{IM_START}{role}\n", self.tokenizer)) + 2 for role in ROLE_NAMES.values()
        }
        default_system = overhead["system"] + len(self._chatml.encode(DEFAULT_SYSTEM_MESSAGE, self.tokenizer))
        frames = {"video": self.data_args.video_frames, "image": 1}

        estimates = []
        for index, (sample, count) in enumerate(zip(self.samples, text_counts)):
            turns = sample["conversations"]
            count += sum(overhead[ROLE_NAMES[t["from"]]] for t in turns)
            if turns[0]["from"] != "system":
                count += default_system
            modality = self.modality_of(index)
            if modality == "text":
                estimates.append(-min(count, self.max_length))
            else:
                # the fast tokens and the newline after the marker
                count += self.num_fast_tokens(frames[modality]) + 1
                estimates.append(min(count, self.max_length))
        return estimates

    # ---- loading

    def _pixels(self, frames_or_image: Any) -> torch.Tensor:
        return self.image_processor.preprocess(frames_or_image, return_tensors="pt")["pixel_values"]

    def _load_image(self, path: str) -> torch.Tensor:
        """``[1, 3, S, S]`` pixels of one image, padded to a square first with ``image_aspect_ratio="pad"``."""
        if not os.path.exists(path):
            raise SampleError(f"image file '{path}' does not exist")
        try:
            with Image.open(path) as raw:
                image = raw.convert("RGB")
        except (OSError, Image.DecompressionBombError) as err:
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
                conversations = _with_time_instruction(conversations, clip.info())
        elif modality == "image":
            pixel_values = self._load_image(sample["image"])

        input_ids, labels = preprocess_qwen(conversations, self.tokenizer, has_visual=pixel_values is not None)
        num_fast = self.num_fast_tokens(pixel_values.shape[0]) if pixel_values is not None else 0
        input_ids, labels = truncate_to_budget(
            input_ids, labels, self.max_length, num_fast, structural_token_ids=self._chatml.structural
        )
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": pixel_values,
            "modality": modality,
            "index": index,
        }

    def _describe(self, index: int) -> str:
        modality = self.modality_of(index)
        return "text-only" if modality == "text" else f"{modality} '{self.samples[index][modality]}'"

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


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


@dataclass
class DataCollatorForSupervisedDataset:
    """Pad a list of :class:`LazySupervisedDataset` items into a batch.

    Returns ``input_ids`` ``[B, L]`` right-padded with the tokenizer's pad id, ``labels`` ``[B, L]``
    padded with ``-100``, a boolean ``attention_mask`` ``[B, L]``, and ``images``: the ``pixel_values``
    of the samples that have them, in batch order (``None`` when no sample has any).
    """

    tokenizer: Any

    def __post_init__(self) -> None:
        if getattr(self.tokenizer, "pad_token_id", None) is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before collating")

    def __call__(self, instances: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not instances:
            raise ValueError("cannot collate an empty batch")
        for b, item in enumerate(instances):
            if item["input_ids"].shape != item["labels"].shape:
                raise ValueError(
                    f"batch item {b}: input_ids {tuple(item['input_ids'].shape)} and labels "
                    f"{tuple(item['labels'].shape)} differ in shape"
                )
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


# --------------------------------------------------------------------------------------------
# Length-grouped sampling
# --------------------------------------------------------------------------------------------


def _check_grouping_args(lengths: Sequence[int], batch_size: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if any(n == 0 for n in lengths):
        first = next(i for i, n in enumerate(lengths) if n == 0)
        raise ValueError(f"lengths[{first}] is 0; lengths must be non-zero (sign = modality)")


def _sorted_megabatches(
    indices: Sequence[int], lengths: Sequence[int], size: int, generator: torch.Generator | None
) -> list[list[int]]:
    """Shuffle ``indices``, cut them into chunks of ``size`` and sort each chunk by length, longest first."""
    order = torch.randperm(len(indices), generator=generator).tolist()
    shuffled = [indices[k] for k in order]
    chunks = [shuffled[k : k + size] for k in range(0, len(shuffled), size)]
    return [sorted(chunk, key=lambda i: -abs(lengths[i])) for chunk in chunks]


def get_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """A permutation of ``range(len(lengths))``: shuffled, then sorted by ``|length|`` (longest first)
    within each mega-batch of ``batch_size * world_size`` consecutive positions."""
    _check_grouping_args(lengths, batch_size, world_size)
    chunks = _sorted_megabatches(range(len(lengths)), lengths, batch_size * world_size, generator)
    return [i for chunk in chunks for i in chunk]


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
    _check_grouping_args(lengths, batch_size, world_size)
    visual = [i for i, n in enumerate(lengths) if n > 0]
    text = [i for i, n in enumerate(lengths) if n < 0]
    if not visual or not text:
        return get_length_grouped_indices(lengths, batch_size, world_size, generator)

    size = batch_size * world_size
    full, partial = [], []
    for group in (visual, text):
        for chunk in _sorted_megabatches(group, lengths, size, generator):
            (full if len(chunk) == size else partial).append(chunk)
    order = torch.randperm(len(full), generator=generator).tolist()
    return [i for k in order for i in full[k]] + [i for chunk in partial for i in chunk]


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
        lengths: Sequence[int] | None = None,
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
        self.lengths = list(lengths)
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
        grouping = get_modality_length_grouped_indices if self.group_by_modality else get_length_grouped_indices
        generator = self.generator
        if self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(grouping(self.lengths, self.batch_size, self.world_size, generator))


def make_supervised_data_module(
    tokenizer: Any,
    image_processor: Any,
    data_args: DataArguments,
    model_config: Any,
    max_length: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The training set and collator for ``transformers.Trainer``:
    ``{"train_dataset", "eval_dataset": None, "data_collator"}``. ``seed``: a mixture's draws (when its file
    gives none)."""
    train_dataset = LazySupervisedDataset(
        data_args.data_path, tokenizer, image_processor, data_args, model_config, max_length=max_length, seed=seed
    )
    return {
        "train_dataset": train_dataset,
        "eval_dataset": None,
        "data_collator": DataCollatorForSupervisedDataset(tokenizer=tokenizer),
    }
