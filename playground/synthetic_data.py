"""Deterministic synthetic video-QA dataset: moving shapes, still images and text-only questions.

Every video shows one to three solid shapes (square, circle, triangle), each in its own colour (red,
green, blue, yellow, white), on a plain dark background. A shape either stands still or moves in a
straight line (left, right, up, down), and may appear later (between a quarter and half of the clip).
Some videos also show a **flash**: a small square mark, in a colour no shape has, visible in exactly one
frame; temporal and spatial pooling blur it away, so it is the detail only uncompressed features keep.
Each video is described by a :class:`SceneSpec`, and every answer is computed from the spec, never from
pixels; shapes never overlap and never leave the frame, and the flash covers no shape, so the answers are
also visible in the rendered frames.

Layout written under ``DIR``::

    videos/{split}_{i:04d}.mp4    images/{split}_{i:04d}.png    {split}.json    {split}.jsonl

The JSON is a list of LLaVA-style samples with paths relative to ``DIR``::

    {"id": ..., "video": "videos/train_0000.mp4",
     "conversations": [{"from": "human", "value": "<image>\\nWhat color is the circle?"},
                       {"from": "gpt", "value": "red"}]}

Text-only samples have neither ``video`` nor ``image`` and no ``<image>``.

Usage::

    python -m playground.synthetic_data --out DIR [--num-videos 24] [--num-images 6] [--num-text 6]
        [--size 64] [--frames 16] [--fps 8] [--seed 0] [--split train] [--questions sampled|all|all_shape|all_shape_flash]
        [--flash-rate 0.3]

The split name is mixed into the seed, so two splits generated with the same ``--seed`` still differ,
and the same arguments give byte-identical JSON and identical frames.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 90, 245),
    "yellow": (245, 220, 30),
    "white": (245, 245, 245),
}
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
# Unit steps (dx, dy) in image coordinates: y grows downwards.
_STEPS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)  # fmt: skip

VIDEO_FAMILIES: tuple[str, ...] = ("video_color", "video_direction", "video_count", "video_first", "video_flash")
# Asked only of training videos, with ``questions="all_shape"`` or ``"all_shape_flash"``: the one family besides
# `first` whose answer is a shape's name ("Which shape is red?"); never in the val or test splits, so their
# families stay the five above.
TRAINING_ONLY_FAMILIES: tuple[str, ...] = ("video_shape",)
IMAGE_FAMILIES: tuple[str, ...] = ("image_color", "image_count")
TEXT_FAMILIES: tuple[str, ...] = ("text_mix", "text_words", "text_arith", "text_sides")
FAMILIES: tuple[str, ...] = VIDEO_FAMILIES + TRAINING_ONLY_FAMILIES + IMAGE_FAMILIES + TEXT_FAMILIES

IMAGE_TOKEN = "<image>"
MIN_SIZE, MAX_SIZE = 64, 128
MIN_FRAMES, MAX_FRAMES = 8, 32
# Gap kept between the bounding boxes of any two shapes in every frame.
_MARGIN = 2
# The flash: side as a fraction of the frame (at least 3 px), and the share of other videos that show one.
FLASH_FRACTION = 0.06
FLASH_RATE = 0.3

_MIXES: tuple[tuple[str, str, str], ...] = (
    ("blue", "yellow", "green"),
    ("red", "yellow", "orange"),
    ("red", "blue", "purple"),
    ("red", "white", "pink"),
    ("black", "white", "gray"),
)
_POLYGON_SIDES: dict[str, int] = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "octagon": 8}
_WORDS: tuple[str, ...] = (
    "the", "cat", "sat", "on", "a", "red", "mat", "dog", "runs", "fast", "in", "park", "sun", "is", "warm",
    "we", "like", "green", "apples", "birds", "sing", "every", "morning", "small", "boat", "sails", "home",
)  # fmt: skip
QUESTION_MODES: tuple[str, ...] = ("sampled", "all", "all_shape", "all_shape_flash")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class ShapeSpec:
    """One solid shape of a scene.

    Attributes:
        shape: one of :data:`SHAPES`.
        color: one of the names in :data:`COLORS`.
        size: side of the shape's square bounding box in pixels.
        x: column of the bounding box's top-left corner in the frame where the shape appears.
        y: row of that corner.
        direction: one of :data:`DIRECTIONS`.
        speed: pixels per frame along ``direction`` (0 when still).
        appear: index of the first frame that shows the shape; it stays visible until the end.
    """

    shape: str
    color: str
    size: int
    x: int
    y: int
    direction: str
    speed: float
    appear: int

    def position(self, t: int) -> tuple[int, int] | None:
        """Top-left ``(x, y)`` of the bounding box in frame ``t``, or ``None`` before the shape appears."""
        if t < self.appear:
            return None
        dx, dy = _STEPS[self.direction]
        travelled = self.speed * (t - self.appear)
        return int(round(self.x + dx * travelled)), int(round(self.y + dy * travelled))

    def center(self, t: int) -> tuple[int, int] | None:
        """A ``(row, col)`` pixel inside the shape in frame ``t`` (the box centre), or ``None`` if not shown."""
        pos = self.position(t)
        if pos is None:
            return None
        return pos[1] + self.size // 2, pos[0] + self.size // 2


@dataclass(frozen=True)
class FlashSpec:
    """A small square mark of ``color`` with top-left corner ``(x, y)`` and side ``size``, shown in frame
    ``frame`` only."""

    color: str
    size: int
    x: int
    y: int
    frame: int


@dataclass(frozen=True)
class SceneSpec:
    """A whole clip: square frames of ``size`` pixels, ``frames`` long, shapes drawn over ``background``,
    and optionally a one-frame ``flash`` drawn over everything."""

    size: int
    frames: int
    background: tuple[int, int, int]
    shapes: tuple[ShapeSpec, ...]
    flash: FlashSpec | None = None

    @property
    def staggered(self) -> bool:
        """Whether exactly one shape appears first and at least one other appears later."""
        appears = sorted(s.appear for s in self.shapes)
        return len(appears) > 1 and appears[0] < appears[1]


@dataclass(frozen=True)
class QA:
    """One question-answer turn and the family it belongs to (one of :data:`FAMILIES`)."""

    family: str
    question: str
    answer: str


@dataclass(frozen=True)
class PlannedSample:
    """One conversation of the dataset before it is serialised.

    ``media`` is ``"video"``, ``"image"`` or ``None`` (text-only); ``media_index`` indexes
    :attr:`DatasetPlan.videos` or :attr:`DatasetPlan.images`.
    """

    id: str
    media: str | None
    media_index: int | None
    turns: tuple[QA, ...]


@dataclass(frozen=True)
class DatasetPlan:
    """Everything :func:`generate_dataset` writes, computed without touching the disk."""

    split: str
    seed: int
    videos: tuple[SceneSpec, ...]
    images: tuple[SceneSpec, ...]
    samples: tuple[PlannedSample, ...]

    def video_path(self, index: int) -> str:
        """Path of video ``index`` relative to the dataset root."""
        return f"videos/{self.split}_{index:04d}.mp4"

    def image_path(self, index: int) -> str:
        """Path of image ``index`` relative to the dataset root."""
        return f"images/{self.split}_{index:04d}.png"

    def records(self) -> list[dict[str, Any]]:
        """The samples in the LLaVA training-annotation format."""
        out = []
        for sample in self.samples:
            record: dict[str, Any] = {"id": sample.id}
            if sample.media == "video":
                record["video"] = self.video_path(sample.media_index)
            elif sample.media == "image":
                record["image"] = self.image_path(sample.media_index)
            conversations = []
            for k, qa in enumerate(sample.turns):
                prefix = f"{IMAGE_TOKEN}\n" if sample.media is not None and k == 0 else ""
                conversations.append({"from": "human", "value": prefix + qa.question})
                conversations.append({"from": "gpt", "value": qa.answer})
            record["conversations"] = conversations
            out.append(record)
        return out

    def family_counts(self) -> dict[str, int]:
        """Number of question-answer turns per family (every family listed, zeros included)."""
        counts = dict.fromkeys(FAMILIES, 0)
        for sample in self.samples:
            for qa in sample.turns:
                counts[qa.family] += 1
        return counts


# ----------------------------------------------------------------- rendering


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of ``shape`` filling its bounding box (triangles point up)."""
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    # Pixel centres sit at +0.5, so the masks are symmetric about the box centre.
    r, c = np.mgrid[0:size, 0:size] + 0.5
    half = size / 2
    if shape == "circle":
        return (r - half) ** 2 + (c - half) ** 2 <= half**2
    if shape == "triangle":
        return np.abs(c - half) <= r / 2
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(spec: SceneSpec) -> np.ndarray:
    """Draw ``spec`` as a ``uint8`` RGB array of shape ``[frames, size, size, 3]``."""
    video = np.empty((spec.frames, spec.size, spec.size, 3), dtype=np.uint8)
    video[:] = spec.background
    for shape in spec.shapes:
        mask = shape_mask(shape.shape, shape.size)
        for t in range(shape.appear, spec.frames):
            x, y = shape.position(t)
            video[t, y : y + shape.size, x : x + shape.size][mask] = COLORS[shape.color]
    if spec.flash is not None:
        f = spec.flash
        video[f.frame, f.y : f.y + f.size, f.x : f.x + f.size] = COLORS[f.color]
    return video


# ----------------------------------------------------------------- scene sampling


def _boxes_overlap(a: ShapeSpec, b: ShapeSpec, frames: int) -> bool:
    for t in range(max(a.appear, b.appear), frames):
        (ax, ay), (bx, by) = a.position(t), b.position(t)
        apart_x = ax >= bx + b.size + _MARGIN or bx >= ax + a.size + _MARGIN
        apart_y = ay >= by + b.size + _MARGIN or by >= ay + a.size + _MARGIN
        if not (apart_x or apart_y):
            return True
    return False


def _sample_shape(
    rng: np.random.Generator, shape: str, color: str, size: int, frames: int, appear: int, still: bool
) -> ShapeSpec:
    lo, hi = max(6, math.ceil(0.10 * size)), math.floor(0.30 * size)
    side = int(rng.integers(lo, hi + 1))
    room = size - side  # top-left coordinates range over [0, room]
    direction = "still" if still else str(rng.choice(DIRECTIONS))
    if direction == "still":
        x, y = (int(v) for v in rng.integers(0, room + 1, size=2))
        return ShapeSpec(shape, color, side, x, y, "still", 0.0, appear)
    # Travel a clearly visible distance (at least half the room, and a fifth of the frame) and end inside it.
    distance = int(rng.integers(max(size // 5, room // 2), room + 1))
    start = int(rng.integers(0, room - distance + 1))
    if direction in ("left", "up"):
        start += distance
    across = int(rng.integers(0, room + 1))
    x, y = (start, across) if direction in ("left", "right") else (across, start)
    return ShapeSpec(shape, color, side, x, y, direction, distance / (frames - 1 - appear), appear)


def _sample_flash(rng: np.random.Generator, size: int, frames: int, shapes: list[ShapeSpec]) -> FlashSpec | None:
    """A flash in a colour no shape has, in one frame away from both ends, covering no shape in that frame."""
    colors = [c for c in COLORS if c not in {s.color for s in shapes}]
    color = str(colors[int(rng.integers(len(colors)))])
    side = max(3, round(FLASH_FRACTION * size))
    frame = int(rng.integers(1, frames - 1))
    for _ in range(200):
        x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        clear = True
        for shape in shapes:
            pos = shape.position(frame)
            if pos is None:
                continue
            sx, sy = pos
            apart_x = x >= sx + shape.size + _MARGIN or sx >= x + side + _MARGIN
            apart_y = y >= sy + shape.size + _MARGIN or sy >= y + side + _MARGIN
            if not (apart_x or apart_y):
                clear = False
                break
        if clear:
            return FlashSpec(color, side, x, y, frame)
    return None


def sample_scene(
    rng: np.random.Generator,
    size: int = 64,
    frames: int = 16,
    num_shapes: int | None = None,
    staggered: bool | None = None,
    still: bool = False,
    flash: bool = False,
) -> SceneSpec:
    """Draw a random scene whose shapes have distinct types and colours and never overlap.

    Args:
        rng: source of randomness (the only one).
        size: frame width and height in pixels.
        frames: clip length; 1 gives a still image.
        num_shapes: 1 to 3, random when ``None``.
        staggered: force (``True``) or forbid (``False``) a single first shape followed by later ones;
            random when ``None``. Needs ``num_shapes != 1`` and ``frames >= 8`` when ``True``.
        still: make every shape stand still.
        flash: add a one-frame flash (see :class:`FlashSpec`); needs ``frames >= 3``.
    """
    if num_shapes is None:
        num_shapes = int(rng.integers(2 if staggered else 1, 4))
    if not 1 <= num_shapes <= len(SHAPES):
        raise ValueError(f"num_shapes must be in [1, {len(SHAPES)}], got {num_shapes}")
    if staggered is None:
        staggered = num_shapes > 1 and frames >= MIN_FRAMES and bool(rng.random() < 0.4)
    if staggered and (num_shapes < 2 or frames < MIN_FRAMES):
        raise ValueError("a staggered scene needs at least two shapes and at least 8 frames")
    if flash and frames < 3:
        raise ValueError("a flash needs at least 3 frames")

    if rng.random() < 0.5:
        grey = int(rng.integers(20, 61))
        background = (grey, grey, grey)
    else:
        background = tuple(int(v) for v in rng.integers(0, 71, size=3))
    kinds = [str(s) for s in rng.permutation(SHAPES)[:num_shapes]]
    colors = [str(c) for c in rng.permutation(list(COLORS))[:num_shapes]]
    # The first shape is on screen from frame 0; later ones pop in between a quarter and half of the clip: late
    # enough that the first quarter shows the first shape alone, early enough that their motion stays visible.
    appears = [0] * num_shapes
    if staggered:
        appears[1:] = [int(a) for a in rng.integers(frames // 4, frames // 2 + 1, size=num_shapes - 1)]

    for _ in range(1000):
        placed: list[ShapeSpec] = []
        for kind, color, appear in zip(kinds, colors, appears):
            for _ in range(100):
                candidate = _sample_shape(rng, kind, color, size, frames, appear, still or frames == 1)
                if not any(_boxes_overlap(candidate, other, frames) for other in placed):
                    placed.append(candidate)
                    break
            else:
                break
        if len(placed) == num_shapes:
            mark = _sample_flash(rng, size, frames, placed) if flash else None
            if flash and mark is None:
                continue
            return SceneSpec(size, frames, background, tuple(placed), mark)
    raise RuntimeError("could not place non-overlapping shapes")  # pragma: no cover - never seen in practice


# ----------------------------------------------------------------- questions


def scene_questions(spec: SceneSpec, media: str = "video") -> dict[str, list[QA]]:
    """Every question the scene answers, by family (``media`` is ``"video"`` or ``"image"``).

    Images get colour and count questions only; videos add direction and, when
    :attr:`SceneSpec.staggered`, which shape appears first, and, when there is a flash, its colour.
    """
    out: dict[str, list[QA]] = {
        f"{media}_color": [QA(f"{media}_color", f"What color is the {s.shape}?", s.color) for s in spec.shapes],
        f"{media}_count": [QA(f"{media}_count", "How many shapes are there?", NUMBER_WORDS[len(spec.shapes)])],
    }
    if media == "video":
        out["video_direction"] = [
            QA("video_direction", f"Which direction does the {s.color} {s.shape} move?", s.direction)
            for s in spec.shapes
        ]
        if spec.staggered:
            first = min(spec.shapes, key=lambda s: s.appear)
            out["video_first"] = [QA("video_first", "Which shape appears first?", first.shape)]
        if spec.flash is not None:
            out["video_flash"] = [QA("video_flash", "What color was the flash?", spec.flash.color)]
    return out


def shape_questions(spec: SceneSpec) -> list[QA]:
    """"Which shape is <colour>?" for each shape of the scene (colours are distinct within a scene)."""
    return [QA("video_shape", f"Which shape is {s.color}?", s.shape) for s in spec.shapes]


def _pick_turns(rng: np.random.Generator, pool: dict[str, list[QA]], primary: str, max_extra: int) -> list[QA]:
    """The primary family's question first, then up to ``max_extra`` other distinct questions."""
    first = pool[primary][int(rng.integers(len(pool[primary])))]
    rest = [qa for qas in pool.values() for qa in qas if qa != first]
    extra = min(int(rng.integers(0, max_extra + 1)), len(rest))
    return [first] + [rest[int(i)] for i in rng.permutation(len(rest))[:extra]]


def _all_turns(rng: np.random.Generator, spec: SceneSpec, pool: dict[str, list[QA]]) -> tuple[QA, ...]:
    """Every question of ``pool`` in a random order, except that a shape's colour question always comes before
    the direction question that names its colour (which would otherwise give the answer away)."""
    turns = [qa for qas in pool.values() for qa in qas]
    turns = [turns[int(k)] for k in rng.permutation(len(turns))]
    for shape in spec.shapes:
        color_at = next(k for k, qa in enumerate(turns) if qa.family.endswith("_color") and shape.shape in qa.question)
        direction_at = next(
            (k for k, qa in enumerate(turns) if qa.family == "video_direction" and f"the {shape.color} {shape.shape} " in qa.question),
            None,
        )
        if direction_at is not None and direction_at < color_at:
            turns[color_at], turns[direction_at] = turns[direction_at], turns[color_at]
    return tuple(turns)


def _media_samples(
    rng: np.random.Generator, turns: list[QA], media: str, index: int, split: str
) -> list[PlannedSample]:
    """Half the time one multi-turn conversation, otherwise one single-turn sample per question."""
    if len(turns) > 1 and rng.random() < 0.5:
        groups = [tuple(turns)]
    else:
        groups = [(qa,) for qa in turns]
    return [PlannedSample(f"{split}_{media}_{index:04d}_{k}", media, index, group) for k, group in enumerate(groups)]


def text_question(rng: np.random.Generator, family: str) -> QA:
    """One text-only question of ``family`` (one of :data:`TEXT_FAMILIES`)."""
    if family == "text_mix":
        a, b, mixed = _MIXES[int(rng.integers(len(_MIXES)))]
        if rng.random() < 0.5:
            a, b = b, a
        return QA(family, f"What color do you get by mixing {a} and {b}?", mixed)
    if family == "text_words":
        words = [_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), size=int(rng.integers(3, 10)))]
        sentence = " ".join(words).capitalize() + "."
        return QA(family, f'How many words are in the sentence "{sentence}"?', NUMBER_WORDS[len(words)])
    if family == "text_arith":
        a, b = (int(v) for v in rng.integers(1, 10, size=2))
        return QA(family, f"What is {a} plus {b}?", NUMBER_WORDS[a + b])
    if family == "text_sides":
        polygon = list(_POLYGON_SIDES)[int(rng.integers(len(_POLYGON_SIDES)))]
        return QA(family, f"How many sides does a {polygon} have?", NUMBER_WORDS[_POLYGON_SIDES[polygon]])
    raise ValueError(f"unknown text family {family!r}; expected one of {TEXT_FAMILIES}")


# ----------------------------------------------------------------- planning and writing


def _check_args(num_videos: int, num_images: int, num_text: int, size: int, frames: int, fps: int, split: str) -> None:
    for name, value in (("num_videos", num_videos), ("num_images", num_images), ("num_text", num_text)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not MIN_SIZE <= size <= MAX_SIZE or size % 2:
        raise ValueError(f"size must be even and in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    if not MIN_FRAMES <= frames <= MAX_FRAMES:
        raise ValueError(f"frames must be in [{MIN_FRAMES}, {MAX_FRAMES}], got {frames}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    if not _SPLIT_RE.match(split):
        raise ValueError(f"split must match {_SPLIT_RE.pattern} (it is used in file names), got {split!r}")


def plan_dataset(
    num_videos: int = 24,
    num_images: int = 6,
    num_text: int = 6,
    size: int = 64,
    frames: int = 16,
    seed: int = 0,
    split: str = "train",
    questions: str = "sampled",
    flash_rate: float = FLASH_RATE,
) -> DatasetPlan:
    """Decide every scene, image and conversation of a dataset without writing anything.

    Videos, images and text draw from independent streams seeded by ``(seed, split)``, so changing one
    count leaves the others unchanged, and the first ``n`` videos are the same for any ``num_videos >= n``.
    Video ``i``'s first question cycles through :data:`VIDEO_FAMILIES` (image ``i`` and text sample ``i``
    likewise), so every family appears once the counts reach the number of families.

    ``questions``: ``"sampled"`` asks each video its primary question and up to two others, half the time as one
    conversation and otherwise one sample each; ``"all"`` asks every question the scene answers
    (:func:`scene_questions`) in one conversation, in a random order where no direction question (which names
    the shape's colour) comes before that shape's colour question; ``"all_shape"`` is ``"all"`` plus a second
    conversation asking which shape has each colour (:func:`shape_questions`; that conversation's order comes
    from a stream of its own, so the first conversation is the one ``"all"`` gives); ``"all_shape_flash"`` is
    ``"all_shape"`` with the flash's question, where the video has a flash, asked again at the end of the second
    conversation (the shape questions halve how often each first conversation is seen; this keeps the flash, the
    rarest family, at the rate ``"all"`` gives it). All draw the same scenes from the same stream, so the videos
    are identical.

    ``flash_rate``: the share of videos whose primary question is not the flash's that show a flash anyway (every
    fifth video, the flash's own, always shows one). At the default, :data:`FLASH_RATE`, the scenes are those every
    split has had; another rate draws other scenes, since a flash takes draws of its own from the videos' stream.
    """
    if questions not in QUESTION_MODES:
        raise ValueError(f"questions must be one of {QUESTION_MODES}, got {questions!r}")
    if not (isinstance(flash_rate, (int, float)) and 0.0 <= flash_rate <= 1.0):
        raise ValueError(f"flash_rate must be a share between 0 and 1, got {flash_rate!r}")
    _check_args(num_videos, num_images, num_text, size, frames, fps=1, split=split)
    # crc32 rather than hash(): str hashes are salted per process.
    # Child i of spawn(n) is the same for every n > i: the fifth stream leaves the first four as they were.
    video_rng, image_rng, text_rng, order_rng, shape_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, zlib.crc32(split.encode())]).spawn(5)
    )

    samples: list[PlannedSample] = []
    videos = []
    for i in range(num_videos):
        primary = VIDEO_FAMILIES[i % len(VIDEO_FAMILIES)]
        flash = primary == "video_flash" or bool(video_rng.random() < flash_rate)
        spec = sample_scene(
            video_rng, size, frames, staggered=True if primary == "video_first" else None, flash=flash
        )
        videos.append(spec)
        pool = scene_questions(spec, "video")
        turns = _pick_turns(video_rng, pool, primary, max_extra=2)
        planned = _media_samples(video_rng, turns, "video", i, split)
        if questions in ("all", "all_shape", "all_shape_flash"):
            # Drawn from a stream of their own, so that the scenes stay those of "sampled".
            planned = [PlannedSample(f"{split}_video_{i:04d}_0", "video", i, _all_turns(order_rng, spec, pool))]
        if questions in ("all_shape", "all_shape_flash"):
            # A conversation of their own: next to a colour or direction question, either would give the other's
            # answer away.
            shapes = shape_questions(spec)
            turns = tuple(shapes[int(k)] for k in shape_rng.permutation(len(shapes)))
            if questions == "all_shape_flash":
                # Last, where the shapes' names give away nothing of the flash's colour but what the video shows
                # (no shape has it).
                turns += tuple(pool.get("video_flash", ()))
            planned.append(PlannedSample(f"{split}_video_{i:04d}_1", "video", i, turns))
        samples += planned

    images = []
    for i in range(num_images):
        primary = IMAGE_FAMILIES[i % len(IMAGE_FAMILIES)]
        spec = sample_scene(image_rng, size, 1, staggered=False, still=True)
        images.append(spec)
        turns = _pick_turns(image_rng, scene_questions(spec, "image"), primary, max_extra=1)
        samples += _media_samples(image_rng, turns, "image", i, split)

    for i in range(num_text):
        qa = text_question(text_rng, TEXT_FAMILIES[i % len(TEXT_FAMILIES)])
        samples.append(PlannedSample(f"{split}_text_{i:04d}", None, None, (qa,)))

    return DatasetPlan(split, seed, tuple(videos), tuple(images), tuple(samples))


def _pick_codec() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(frames: np.ndarray, path: str | os.PathLike[str], fps: int = 8) -> str:
    """Encode ``[T, H, W, 3]`` RGB ``uint8`` frames to ``path`` (even H and W); returns the codec used."""
    import av

    codec = _pick_codec()
    _, height, width, _ = frames.shape
    # bitexact keeps library version strings out of the container so reruns give the same bytes.
    with av.open(str(path), mode="w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            # Low crf keeps the small saturated shapes' colours; one thread keeps the bitstream reproducible.
            stream.options = {"crf": "18", "preset": "medium", "threads": "1"}
        else:
            stream.bit_rate = 400_000
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return codec


def generate_dataset(
    out: str | os.PathLike[str],
    num_videos: int = 24,
    num_images: int = 6,
    num_text: int = 6,
    size: int = 64,
    frames: int = 16,
    fps: int = 8,
    seed: int = 0,
    split: str = "train",
    questions: str = "sampled",
    flash_rate: float = FLASH_RATE,
) -> dict[str, Any]:
    """Render and write a dataset under ``out`` (see the module docstring for the layout).

    Args:
        out: dataset root; created if missing. Existing files of the same split are overwritten.
        num_videos: number of clips (each gives one or more samples).
        num_images: number of still images (each gives one or more samples).
        num_text: number of text-only samples.
        size: frame width and height, even, in [64, 128].
        frames: frames per clip, in [8, 32].
        fps: frame rate written to the videos.
        seed: random seed; the split name is mixed in.
        split: name used in file names (letters, digits, ``_`` and ``-``).
        questions: which questions each video is asked: one of :data:`QUESTION_MODES` (see :func:`plan_dataset`).
        flash_rate: share of the other videos that show a flash besides the flash's own (see :func:`plan_dataset`).

    Returns:
        A summary: split, seed, codec, the JSON/JSONL and media paths, sample counts and
        ``families`` (question-answer turns per family).
    """
    from PIL import Image

    _check_args(num_videos, num_images, num_text, size, frames, fps, split)
    plan = plan_dataset(num_videos, num_images, num_text, size, frames, seed, split, questions, flash_rate)
    root = Path(out)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)

    codec = None
    for i, spec in enumerate(plan.videos):
        codec = write_video(render_scene(spec), root / plan.video_path(i), fps)
    for i, spec in enumerate(plan.images):
        Image.fromarray(render_scene(spec)[0]).save(root / plan.image_path(i))

    records = plan.records()
    json_path, jsonl_path = root / f"{split}.json", root / f"{split}.jsonl"
    json_path.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    return {
        "split": split,
        "seed": seed,
        "root": str(root),
        "json": str(json_path),
        "jsonl": str(jsonl_path),
        "codec": codec,
        "videos": [plan.video_path(i) for i in range(len(plan.videos))],
        "images": [plan.image_path(i) for i in range(len(plan.images))],
        "num_samples": len(records),
        "num_video_samples": sum(s.media == "video" for s in plan.samples),
        "num_image_samples": sum(s.media == "image" for s in plan.samples),
        "num_text_samples": sum(s.media is None for s in plan.samples),
        "families": plan.family_counts(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; prints the summary as JSON."""
    parser = argparse.ArgumentParser(prog="python -m playground.synthetic_data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="dataset root directory")
    parser.add_argument("--num-videos", type=int, default=24, help="number of videos (default: 24)")
    parser.add_argument("--num-images", type=int, default=6, help="number of images (default: 6)")
    parser.add_argument("--num-text", type=int, default=6, help="number of text-only samples (default: 6)")
    parser.add_argument("--size", type=int, default=64, help="frame width and height, even, 64-128 (default: 64)")
    parser.add_argument("--frames", type=int, default=16, help="frames per video, 8-32 (default: 16)")
    parser.add_argument("--fps", type=int, default=8, help="video frame rate (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--split", default="train", help="split name used in file names (default: train)")
    parser.add_argument(
        "--questions", default="sampled", choices=QUESTION_MODES,
        help="per video: its primary question and up to two others (sampled, the default), or every question it "
        "answers in one conversation (all), or all plus a second conversation asking which shape has each colour "
        "(all_shape), and that second conversation also asking the flash's colour where there is one (all_shape_flash)",
    )
    parser.add_argument(
        "--flash-rate", type=float, default=FLASH_RATE,
        help=f"share of the videos not asked the flash first that show one anyway (default: {FLASH_RATE}; another "
        "value draws other scenes)",
    )
    args = parser.parse_args(argv)
    try:
        summary = generate_dataset(
            args.out,
            num_videos=args.num_videos,
            num_images=args.num_images,
            num_text=args.num_text,
            size=args.size,
            frames=args.frames,
            fps=args.fps,
            seed=args.seed,
            split=args.split,
            questions=args.questions,
            flash_rate=args.flash_rate,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
