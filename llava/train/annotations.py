"""Training annotations: the sample format, its validation, and readers that stream a file one sample at a time.

A training set is a JSON list (or a JSON Lines file) of samples::

    {"video": "clips/a.mp4",            # or "image": "pics/b.png", or neither (text only)
     "conversations": [{"from": "human", "value": "<image>\\nWhat happens?"},
                       {"from": "gpt", "value": "A dog runs."}]}

:func:`iter_annotations` reads a file of any size in bounded memory (a JSON list is parsed element by element),
validates each sample and names the file and the line (JSON Lines) or index (JSON list) of the first problem.
:func:`load_annotations` collects them into a list. Both :mod:`llava.train.data` and :mod:`llava.train.mixture`
build on this module, which imports neither.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from llava.constants import DEFAULT_IMAGE_TOKEN

__all__ = [
    "ROLE_NAMES",
    "AnnotationError",
    "AnnotationRecord",
    "conversation_problem",
    "iter_annotations",
    "load_annotations",
    "sample_problem",
]

# Annotation speaker -> ChatML role.
ROLE_NAMES: dict[str, str] = {"system": "system", "human": "user", "gpt": "assistant"}
MEDIA_KEYS = ("video", "image")
_CHUNK_BYTES = 1 << 20
# A decode error this close to the end of the text read so far may only mean that the element continues.
_TRUNCATION_MARGIN = 64


class AnnotationError(ValueError):
    """The annotation file cannot be parsed, or one of its samples is malformed (the message says where)."""


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def conversation_problem(conversations: Any) -> str | None:
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


def sample_problem(sample: Any) -> str | None:
    """Describe what is wrong with one annotation sample (``"field: why"``), or return ``None``."""
    if not isinstance(sample, dict):
        return f"a sample must be a JSON object, got {type(sample).__name__}"
    if "conversations" not in sample:
        return "conversations: missing"
    problem = conversation_problem(sample["conversations"])
    if problem:
        return problem
    media = [key for key in MEDIA_KEYS if sample.get(key) is not None]
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


def resolve_media(sample: dict, video_folder: str | None, image_folder: str | None) -> dict:
    """Drop ``video``/``image`` keys set to null and join relative media paths to their folder (videos to
    ``video_folder``, or ``image_folder`` without one, as the reference does). Edits ``sample`` in place."""
    folders = {"video": video_folder or image_folder, "image": image_folder}
    for key, folder in folders.items():
        if sample.get(key) is None:
            sample.pop(key, None)
        elif folder and not os.path.isabs(sample[key]):
            sample[key] = os.path.join(folder, sample[key])
    return sample


# --------------------------------------------------------------------------------------------
# Streaming readers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnotationRecord:
    """One validated sample: ``where`` is ``"line N"`` (JSON Lines) or ``"index N"`` (JSON list), ``number`` N."""

    where: str
    number: int
    sample: dict


class _TextStream:
    """UTF-8 text of a binary file read chunk by chunk, with the byte offset reported on a decoding error and every
    byte read handed to ``on_bytes`` (the content hash)."""

    def __init__(self, handle: BinaryIO, path: str, on_bytes: Callable[[bytes], None] | None) -> None:
        self.handle, self.path, self.on_bytes = handle, path, on_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.offset = 0
        self.eof = False

    def read(self, size: int) -> str:
        raw = self.handle.read(size)
        if self.on_bytes is not None and raw:
            self.on_bytes(raw)
        self.eof = not raw
        try:
            text = self.decoder.decode(raw, final=self.eof)
        except UnicodeDecodeError as err:
            raise AnnotationError(f"{self.path}: not UTF-8 text ({err.reason} at byte {self.offset + err.start})") from None
        self.offset += len(raw)
        return text


def _first_character(stream: _TextStream) -> tuple[str, str]:
    """``(first non-whitespace character or "", the text read so far)``."""
    text = ""
    while not stream.eof:
        text += stream.read(4096)
        stripped = text.lstrip()
        if stripped:
            return stripped[0], text
    return "", text


def _iter_json_lines(stream: _TextStream, head: str, path: str) -> Iterator[tuple[str, int, Any]]:
    """``("line N", N, value)`` per non-blank line; lines end at ``\\n`` only (JSON strings may hold U+2028)."""
    buffer, pos, lineno = head, 0, 0
    while True:
        cut = buffer.find("\n", pos)
        if cut < 0 and not stream.eof:
            buffer, pos = buffer[pos:] + stream.read(_CHUNK_BYTES), 0
            continue
        line = buffer[pos:] if cut < 0 else buffer[pos:cut]
        lineno += 1
        if line.strip():
            try:
                yield f"line {lineno}", lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise AnnotationError(f"{path}: invalid JSON at line {lineno}, column {err.colno}: {err.msg}") from None
        if cut < 0:
            return
        pos = cut + 1


class _JsonListParser:
    """The elements of a top-level JSON list, parsed one at a time from a sliding window of the text.

    Errors carry the line and column in the whole file, as ``json.loads`` of the whole text would report them.
    """

    def __init__(self, stream: _TextStream, head: str, path: str) -> None:
        self.stream, self.path = stream, path
        self.buffer, self.pos = head, 0
        self.line, self.column = 1, 1  # of buffer[0]
        self.decoder = json.JSONDecoder()

    def _where(self, pos: int) -> tuple[int, int]:
        newlines = self.buffer.count("\n", 0, pos)
        if not newlines:
            return self.line, self.column + pos
        return self.line + newlines, pos - self.buffer.rindex("\n", 0, pos)

    def _fail(self, message: str, pos: int) -> AnnotationError:
        line, column = self._where(pos)
        return AnnotationError(f"{self.path}: invalid JSON at line {line}, column {column}: {message}")

    def _more(self) -> bool:
        """Read the next chunk (dropping what was consumed); False at the end of the file."""
        if self.stream.eof:
            return False
        if self.pos:
            self.line, self.column = self._where(self.pos)
            self.buffer = self.buffer[self.pos :]
            self.pos = 0
        self.buffer += self.stream.read(max(_CHUNK_BYTES, len(self.buffer)))
        return True

    def _skip_space(self) -> str:
        """The next non-whitespace character (``""`` at the end of the file), left unconsumed."""
        while True:
            while self.pos < len(self.buffer) and self.buffer[self.pos] in " \t\n\r":
                self.pos += 1
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self._more():
                return ""

    def _value(self) -> Any:
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError as err:
                truncated = err.pos >= len(self.buffer) - _TRUNCATION_MARGIN or err.msg.startswith("Unterminated")
                if truncated and self._more():
                    continue
                raise self._fail(err.msg, err.pos) from None
            if end >= len(self.buffer) and self._more():  # a number may go on in the next chunk
                continue
            self.pos = end
            return value

    def __iter__(self) -> Iterator[tuple[str, int, Any]]:
        if self._skip_space() != "[":
            raise self._fail("expected a JSON list", self.pos)
        self.pos += 1
        if self._skip_space() == "]":
            self.pos += 1
        else:
            index = 0
            while True:
                if not self._skip_space():
                    raise self._fail("Expecting value", self.pos)
                yield f"index {index}", index, self._value()
                index += 1
                separator = self._skip_space()
                if separator == ",":
                    self.pos += 1
                    continue
                if separator == "]":
                    self.pos += 1
                    break
                raise self._fail("Expecting ',' delimiter", self.pos)
        if self._skip_space():
            raise self._fail("Extra data", self.pos)


def iter_annotations(
    path: str | os.PathLike[str],
    *,
    video_folder: str | None = None,
    image_folder: str | None = None,
    on_bytes: Callable[[bytes], None] | None = None,
) -> Iterator[AnnotationRecord]:
    """Stream and validate the samples of an annotation file, resolving their media paths.

    The file is JSON Lines when its name ends in ``.jsonl`` or its content starts with ``{``; otherwise it must
    hold a JSON list. Every sample is checked (see :func:`load_annotations`) as it is read; memory does not grow
    with the file. After a malformed sample nothing more is yielded, but the rest of the file is still parsed, so
    that a syntax error anywhere is the error reported, as when the whole file is parsed at once. ``on_bytes`` receives every byte of the file in order (to hash the content as it is read).

    Raises:
        AnnotationError: as :func:`load_annotations`, on the first problem.
    """
    path = os.fspath(path)
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise AnnotationError(f"cannot read annotation file '{path}': {err.strerror or err}") from None
    with handle:
        stream = _TextStream(handle, path, on_bytes)
        try:
            first, head = _first_character(stream)
            if not first:
                raise AnnotationError(f"{path}: the file is empty; expected a JSON list or JSON Lines of samples")
            if path.lower().endswith(".jsonl") or first == "{":
                records = _iter_json_lines(stream, head, path)
            elif first == "[":
                records = iter(_JsonListParser(stream, head, path))
            else:
                raise AnnotationError(f"{path}: expected a JSON list ('[...]') or JSON Lines (one object per line)")
            count, first_problem = 0, None
            for where, number, sample in records:
                if first_problem:
                    continue  # parse on: a syntax error further down is reported first, as json.loads would
                problem = sample_problem(sample)
                if problem:
                    first_problem = f"{path}: {where}: {problem}"
                    continue
                count += 1
                yield AnnotationRecord(where, number, resolve_media(sample, video_folder, image_folder))
        except OSError as err:
            raise AnnotationError(f"cannot read annotation file '{path}': {err.strerror or err}") from None
    if first_problem:
        raise AnnotationError(first_problem)
    if not count:
        raise AnnotationError(f"{path}: contains no samples")


def load_annotations(
    path: str | os.PathLike[str],
    *,
    video_folder: str | None = None,
    image_folder: str | None = None,
) -> list[dict]:
    """Read and validate a training annotation file into a list (for a large file, see the annotation store,
    :mod:`llava.train.store`, which keeps the samples on disk).

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
    return [r.sample for r in iter_annotations(path, video_folder=video_folder, image_folder=image_folder)]
