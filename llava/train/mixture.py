"""Data mixtures: one training set drawn from several annotation files, each with its own folders and amount.

``--data_path`` names either one annotation file (a JSON list or JSON Lines, see
:func:`llava.train.data.load_annotations`) or a mixture file, YAML (``.yaml`` / ``.yml``) or a JSON object::

    seed: 0                       # optional: the draws' seed (default: --data_seed, else --seed)
    sources:
      - name: academic_oe         # optional, unique (default: the annotation file's name without extension)
        annotation: llava_video/0_30_s_academic_oe.json
        video_folder: llava_video/videos
        ratio: 0.5                # half of the file's samples, drawn at random
      - name: clevrer
        annotation: videochat2/clevrer.jsonl
        video_folder: videochat2/clevrer
        percent: 250              # every sample twice, plus half of them drawn at random once more
      - annotation: text/sharegpt.json
        count: 20000              # 20,000 samples: drawn at random, or repeated if the file has fewer

A source's amount is at most one of ``ratio``, ``percent`` and ``count`` (none: every sample once). ``n`` samples
out of a file of ``N``: every sample ``n // N`` times, plus ``n % N`` distinct samples drawn with a generator
seeded by the mixture's seed and the source's name (so changing one source leaves the others' draws alone).

Relative paths in the mixture (annotation files and folders) are relative to the mixture file's folder. A source
that gives ``video_folder`` or ``image_folder`` resolves its samples' relative paths against its own folders
only (videos against ``video_folder``, or ``image_folder`` when it has no ``video_folder``); a source that gives
neither uses the command line's ``--video_folder`` / ``--image_folder``.
"""

from __future__ import annotations

import json
import json.scanner
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from .annotations import AnnotationError, load_annotations
from .samples import TrainingSamples
from .store import STORE_FORMAT, open_annotation_store, publish, store_key, write_manifest

logger = logging.getLogger("llava.train.data")

__all__ = ["MixtureError", "SourceSpec", "SourceSummary", "is_mixture_file", "load_mixture", "open_mixture", "read_mixture"]

MIXTURE_SUFFIXES = (".yaml", ".yml")
AMOUNT_KEYS = ("ratio", "percent", "count")
SOURCE_KEYS = ("name", "annotation", "video_folder", "image_folder") + AMOUNT_KEYS
TOP_LEVEL_KEYS = ("seed", "sources")
# A JSON mixture file is a small object; a file above this size is taken for annotations without parsing it twice.
_MAX_JSON_MIXTURE_BYTES = 1 << 20


class MixtureError(AnnotationError):
    """The mixture file, one of its sources, or a source's annotation file is unusable (the message says where)."""


@dataclass(frozen=True)
class SourceSummary:
    """What one source contributes: ``selected`` samples out of the ``available`` ones of its file."""

    name: str
    annotation: str
    available: int
    selected: int
    amount: str  # how the amount was given, e.g. "ratio 0.5", "count 200", "all"

    def describe(self) -> str:
        """One log line: ``name: selected of available samples (amount, how)``."""
        if self.selected == self.available:
            how = "every sample once"
        elif self.selected < self.available:
            how = "drawn at random"
        else:
            repeats, extra = divmod(self.selected, self.available)
            how = f"every sample {repeats}x" + (f", {extra} drawn at random once more" if extra else "")
        return f"{self.name}: {self.selected} of {self.available} samples ({self.amount}: {how}) from {self.annotation}"


class _Located(dict):
    """A mapping that remembers the line of the mixture file it starts on."""

    line: int | None = None


# --------------------------------------------------------------------------------------------
# Parsing with line numbers
# --------------------------------------------------------------------------------------------


def _parse_yaml(text: str, path: str) -> Any:
    import yaml

    class LineLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> _Located:
        mapping = _Located(loader.construct_mapping(node, deep=True))
        mapping.line = node.start_mark.line + 1
        return mapping

    LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        return yaml.load(text, Loader=LineLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise MixtureError(f"{path}: invalid YAML{where}: {problem}") from None


def _parse_json(text: str, path: str) -> Any:
    """``json.loads`` whose objects are :class:`_Located` (the pure-Python scanner reports where objects start)."""
    decoder = json.JSONDecoder()
    parse_object = decoder.parse_object

    def located_object(s_and_end, *args):
        text_, end = s_and_end
        value, new_end = parse_object(s_and_end, *args)
        located = _Located(value)
        located.line = text_.count("\n", 0, end) + 1
        return located, new_end

    decoder.parse_object = located_object
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    try:
        return decoder.decode(text)
    except json.JSONDecodeError as err:
        raise MixtureError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None


def is_mixture_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a mixture file: a ``.yaml`` / ``.yml`` file, or a (small) JSON file whose top level
    is an object with a ``sources`` key. Annotation files (a JSON list, JSON Lines) are not."""
    path = os.fspath(path)
    if path.lower().endswith(MIXTURE_SUFFIXES):
        return True
    if path.lower().endswith(".jsonl"):
        return False
    try:
        if os.path.getsize(path) > _MAX_JSON_MIXTURE_BYTES:
            return False
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError):
        return False  # load_annotations reports the problem
    if not text.lstrip().startswith("{"):
        return False
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False  # JSON Lines, or broken: load_annotations says where
    return isinstance(value, dict) and "sources" in value


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _amount(entry: dict, where: str) -> tuple[str, float] | None:
    """``(key, value)`` of the source's amount, or ``None`` for every sample once."""
    given = [key for key in AMOUNT_KEYS if key in entry]
    if len(given) > 1:
        raise MixtureError(f"{where}: give one of {', '.join(AMOUNT_KEYS)}, not {' and '.join(given)}")
    if not given:
        return None
    key = given[0]
    value = entry[key]
    if key == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MixtureError(f"{where}: count must be a positive integer, got {value!r}")
    elif not _is_number(value) or value <= 0:
        raise MixtureError(f"{where}: {key} must be a positive number, got {value!r}")
    return key, value


def _selected_count(amount: tuple[str, float] | None, available: int, where: str) -> tuple[int, str]:
    if amount is None:
        return available, "all"
    key, value = amount
    if key == "count":
        count = int(value)
    else:
        fraction = value if key == "ratio" else value / 100
        count = round(fraction * available)
    label = f"{key} {value:g}" if key != "count" else f"count {int(value)}"
    if count < 1:
        raise MixtureError(f"{where}: {label} of {available} samples selects none")
    return count, label


def _select(available: int, count: int, seed: int, name: str) -> list[int]:
    """Indices of ``count`` samples out of ``available``: whole repeats in file order, then a seeded draw."""
    repeats, extra = divmod(count, available)
    indices = list(range(available)) * repeats
    if extra:
        rng = random.Random(f"{seed}:{name}")
        indices += sorted(rng.sample(range(available), extra))
    return indices


def _path_field(entry: dict, key: str, where: str, base: str) -> str | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise MixtureError(f"{where}: {key} must be a non-empty path string, got {value!r}")
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSpec:
    """One validated source of a mixture file: its annotation file (checked to exist), the folders its samples'
    relative paths resolve against, its amount (``None``: every sample once) and ``where`` it is in the file."""

    name: str
    annotation: str
    video_folder: str | None
    image_folder: str | None
    amount: tuple[str, float] | None
    where: str


def read_mixture(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    video_folder: str | None = None,
    image_folder: str | None = None,
) -> tuple[list[SourceSpec], int]:
    """Read and validate a mixture file (not its annotation files).

    Returns:
        ``(sources, seed)``: each source with its folders resolved (its own, else ``video_folder`` /
        ``image_folder``), and the draws' seed (the file's, else ``seed``).

    Raises:
        MixtureError: the file cannot be read or parsed, a source is malformed or its annotation file or one of
            its folders is missing (the message names the source and its line in the mixture file).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except OSError as err:
        raise MixtureError(f"cannot read mixture file '{path}': {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise MixtureError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    document = _parse_yaml(text, path) if path.lower().endswith(MIXTURE_SUFFIXES) else _parse_json(text, path)

    if isinstance(document, list):
        document = {"sources": document}
    if not isinstance(document, dict):
        raise MixtureError(f"{path}: expected a list of sources or an object with 'sources', got {type(document).__name__}")
    unknown = sorted(set(document) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise MixtureError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; expected {list(TOP_LEVEL_KEYS)}")
    if "seed" in document:
        seed = document["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise MixtureError(f"{path}: seed must be an integer, got {seed!r}")
    entries = document.get("sources")
    if not isinstance(entries, list) or not entries:
        raise MixtureError(f"{path}: 'sources' must be a non-empty list of sources")

    base = os.path.dirname(os.path.abspath(path))
    sources: list[SourceSpec] = []
    names: dict[str, str] = {}
    for number, entry in enumerate(entries, start=1):
        line = getattr(entry, "line", None)
        where = f"{path}: source {number}" + (f" (line {line})" if line else "")
        if not isinstance(entry, dict):
            raise MixtureError(f"{where}: a source must be an object with 'annotation', got {type(entry).__name__}")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise MixtureError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; expected {list(SOURCE_KEYS)}")
        annotation = _path_field(entry, "annotation", where, base)
        if annotation is None:
            raise MixtureError(f"{where}: 'annotation' (the source's JSON or JSONL file) is missing")
        name = entry.get("name", os.path.splitext(os.path.basename(annotation))[0])
        if not isinstance(name, str) or not name:
            raise MixtureError(f"{where}: name must be a non-empty string, got {name!r}")
        where = f"{path}: source {number} '{name}'" + (f" (line {line})" if line else "")
        if name in names:
            raise MixtureError(f"{where}: the name is already used by {names[name]}; give each source its own name")
        names[name] = f"source {number}" + (f" (line {line})" if line else "")
        amount = _amount(entry, where)

        own_video, own_image = _path_field(entry, "video_folder", where, base), _path_field(entry, "image_folder", where, base)
        for key, folder in (("video_folder", own_video), ("image_folder", own_image)):
            if folder is not None and not os.path.isdir(folder):
                raise MixtureError(f"{where}: {key} '{folder}' is not a directory")
        folders = (own_video, own_image) if (own_video or own_image) else (video_folder, image_folder)
        if not os.path.isfile(annotation):
            raise MixtureError(f"{where}: annotation file '{annotation}' does not exist")
        sources.append(SourceSpec(name, annotation, folders[0], folders[1], amount, where))
    return sources, seed


def _log_mixture(path: str, summaries: list[SourceSummary], total: int, seed: int) -> None:
    logger.info("data mixture %s: %d sources, %d samples (seed %d)", path, len(summaries), total, seed)
    for summary in summaries:
        logger.info("  %s", summary.describe())


def load_mixture(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    video_folder: str | None = None,
    image_folder: str | None = None,
) -> tuple[list[dict], list[SourceSummary]]:
    """Read a mixture file, validate every source and its annotations, and draw each source's samples, into a
    list (training reads mixtures through :func:`open_mixture`, which keeps the samples on disk).

    Args:
        path: the mixture file (YAML, or a JSON object with ``sources``).
        seed: the draws' seed when the file gives none.
        video_folder, image_folder: the command line's folders, for sources that give neither.

    Returns:
        ``(samples, summaries)``: the samples of every source in the mixture's order (media paths resolved), and
        what each source contributed.

    Raises:
        MixtureError: the file cannot be read or parsed, a source is malformed, its annotation file is missing or
            has a malformed sample (the message names the source, its line in the mixture file and, for an
            annotation problem, the annotation file's line or index), or it selects no sample.
    """
    path = os.fspath(path)
    sources, seed = read_mixture(path, seed=seed, video_folder=video_folder, image_folder=image_folder)
    samples: list[dict] = []
    summaries: list[SourceSummary] = []
    for source in sources:
        try:
            records = load_annotations(source.annotation, video_folder=source.video_folder, image_folder=source.image_folder)
        except AnnotationError as err:
            raise MixtureError(f"{source.where}: {err}") from None
        count, label = _selected_count(source.amount, len(records), source.where)
        samples.extend(records[i] for i in _select(len(records), count, seed, source.name))
        summaries.append(SourceSummary(source.name, source.annotation, len(records), count, label))
    _log_mixture(path, summaries, len(samples), seed)
    return samples, summaries


def open_mixture(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    video_folder: str | None = None,
    image_folder: str | None = None,
    cache_dir: str | None = None,
) -> tuple[TrainingSamples, list[SourceSummary]]:
    """The training samples of a mixture file, kept in the annotation store (:mod:`llava.train.store`): one store
    per annotation file, and the mixture's draws as a memory-mapped index of rows (built once, like a store).

    Returns:
        ``(samples, summaries)``: a :class:`~llava.train.samples.TrainingSamples` and what each source contributed.

    Raises:
        MixtureError: as :func:`load_mixture`.
    """
    path = os.fspath(path)
    sources, seed = read_mixture(path, seed=seed, video_folder=video_folder, image_folder=image_folder)
    stores, summaries, counts = [], [], []
    for source in sources:
        try:
            store = open_annotation_store(
                source.annotation, video_folder=source.video_folder, image_folder=source.image_folder, cache_dir=cache_dir
            )
        except AnnotationError as err:
            raise MixtureError(f"{source.where}: {err}") from None
        count, label = _selected_count(source.amount, len(store), source.where)
        stores.append(store)
        counts.append(count)
        summaries.append(SourceSummary(source.name, source.annotation, len(store), count, label))

    plan = [(s.name, os.path.basename(store.folder), count) for s, store, count in zip(sources, stores, counts)]
    final = os.path.join(os.path.dirname(stores[0].folder), f"mixture-{store_key('mixture', STORE_FORMAT, seed, plan)}")

    def build(tmp: str) -> None:
        os.makedirs(tmp)
        offsets = np.cumsum([0] + [len(store) for store in stores])
        parts = [
            offsets[k] + np.asarray(_select(len(store), count, seed, source.name), dtype=np.int64)
            for k, (source, store, count) in enumerate(zip(sources, stores, counts))
        ]
        np.save(os.path.join(tmp, "index.npy"), np.concatenate(parts))
        write_manifest(tmp, dict(mixture=os.path.abspath(path), seed=seed, plan=plan, rows=int(sum(counts))))

    publish(final, build, f"draws of mixture {path}")
    index = np.load(os.path.join(final, "index.npy"), mmap_mode="r")
    samples = TrainingSamples(stores, index)
    _log_mixture(path, summaries, len(samples), seed)
    return samples, summaries
