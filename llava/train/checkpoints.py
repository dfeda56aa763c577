"""Checkpoints that a resumed run can trust.

A ``checkpoint-N`` folder counts as complete only once its completion marker (:data:`COMPLETE_MARKER`) exists.
The trainer writes the marker last, after every process has written its part (weights, optimizer and ZeRO
shards, scheduler, RNG states, trainer state), through a temporary name renamed into place, so a save killed at
any point leaves a folder without a marker. The marker lists every file of the checkpoint with its size; a
checkpoint whose files no longer match (deleted or truncated later) is not complete either.

:func:`find_resume_checkpoint` picks the newest complete checkpoint and says why it passed over newer ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Collection

logger = logging.getLogger("llava.train")

__all__ = [
    "COMPLETE_MARKER",
    "checkpoint_problem",
    "find_resume_checkpoint",
    "list_checkpoints",
    "rotate_checkpoints",
    "write_completion_marker",
]

COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``checkpoint-<step>`` folder in ``output_dir``, oldest step first."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_NAME.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every filesystem syncs directories
    finally:
        os.close(fd)


def write_completion_marker(checkpoint_dir: str | os.PathLike[str], global_step: int) -> str:
    """Mark ``checkpoint_dir`` complete: list its files and sizes in :data:`COMPLETE_MARKER`, written to a
    temporary name, flushed to disk and renamed into place. Call it once every process has finished writing.

    Returns:
        The marker's path.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    files = {}
    for root, _, names in os.walk(checkpoint_dir):
        for name in names:
            if name == COMPLETE_MARKER or name.startswith(f".{COMPLETE_MARKER}"):
                continue
            full = os.path.join(root, name)
            files[os.path.relpath(full, checkpoint_dir)] = os.path.getsize(full)
    payload = {
        "global_step": global_step,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": dict(sorted(files.items())),
    }
    final = os.path.join(checkpoint_dir, COMPLETE_MARKER)
    temporary = os.path.join(checkpoint_dir, f".{COMPLETE_MARKER}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    _fsync_dir(checkpoint_dir)
    return final


def checkpoint_problem(checkpoint_dir: str | os.PathLike[str]) -> str | None:
    """Why ``checkpoint_dir`` cannot be resumed from, or ``None`` when it is complete."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    marker = os.path.join(checkpoint_dir, COMPLETE_MARKER)
    if not os.path.isfile(marker):
        return f"no {COMPLETE_MARKER}: its save did not finish"
    try:
        with open(marker, encoding="utf-8") as handle:
            payload = json.load(handle)
        files = payload["files"]
        step = payload["global_step"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {COMPLETE_MARKER} is unreadable ({err})"
    match = _CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(checkpoint_dir)))
    if match and int(match.group(1)) != step:
        return f"its {COMPLETE_MARKER} is for step {step}"
    for relative, size in files.items():
        path = os.path.join(checkpoint_dir, relative)
        if not os.path.isfile(path):
            return f"'{relative}', listed in its {COMPLETE_MARKER}, is missing"
        actual = os.path.getsize(path)
        if actual != size:
            return f"'{relative}' has {actual} bytes where its {COMPLETE_MARKER} lists {size}"
    return None


def find_resume_checkpoint(output_dir: str | os.PathLike[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete checkpoint of ``output_dir``.

    Returns:
        ``(path or None, skipped)``: ``skipped`` holds ``(path, why)`` for every newer checkpoint that is not
        complete, newest first.
    """
    skipped = []
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def rotate_checkpoints(
    output_dir: str | os.PathLike[str], keep: int | None, protected: Collection[str] = ()
) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints (never a ``protected`` one), and every
    incomplete one. Call it right after a checkpoint was completed; with no ``keep`` nothing is deleted.

    Returns:
        The deleted folders.
    """
    if not keep or keep <= 0:
        return []
    protected = {os.path.abspath(p) for p in protected if p}
    complete, incomplete = [], []
    for _, path in list_checkpoints(output_dir):
        (complete if checkpoint_problem(path) is None else incomplete).append(path)
    doomed = [p for p in complete[:-keep] if os.path.abspath(p) not in protected] + incomplete
    for path in doomed:
        logger.info("deleting checkpoint %s (save_total_limit %d%s)", path, keep,
                    "" if path in complete else ", incomplete")
        shutil.rmtree(path, ignore_errors=True)
    return doomed
