"""Checkpoints that a resumed run can trust.

A ``checkpoint-N`` folder counts as complete only once its completion marker (:data:`COMPLETE_MARKER`) exists.
The trainer writes the marker last, after every process has written its part (weights, optimizer and ZeRO
shards, scheduler, RNG states, trainer state), through a temporary name renamed into place, so a save killed at
any point leaves a folder without a marker. The marker lists every file of the checkpoint with its size; a
checkpoint whose files no longer match (deleted or truncated later) is not complete either. It also records how the
run was set up (``run``: world size, ZeRO stage, data fingerprint, command-line arguments; see
:mod:`llava.train.run_record`), which a resumed run compares with its own before building the model.

:func:`find_resume_checkpoint` picks the newest complete checkpoint and says why it passed over newer ones.
Nothing here deletes a complete checkpoint that could be the newest work: :func:`rotate_checkpoints` never deletes
the one just written, and a checkpoint a run must not resume from is moved into ``OUTPUT_DIR/set_aside/``
(:func:`set_aside`) rather than deleted.
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
    "SET_ASIDE_DIR",
    "checkpoint_problem",
    "checkpoint_step",
    "find_resume_checkpoint",
    "list_checkpoints",
    "newest_complete_step",
    "read_run_record",
    "rotate_checkpoints",
    "set_aside",
    "write_completion_marker",
]

COMPLETE_MARKER = "checkpoint_complete.json"
SET_ASIDE_DIR = "set_aside"  # inside the output folder; not a checkpoint-* name, so never resumed nor rotated
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """The step of a ``checkpoint-<step>`` folder, from its name (``None`` for another name)."""
    match = _CHECKPOINT_NAME.match(os.path.basename(os.path.normpath(os.fspath(path))))
    return int(match.group(1)) if match else None


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


def write_completion_marker(
    checkpoint_dir: str | os.PathLike[str], global_step: int, run: dict | None = None
) -> str:
    """Mark ``checkpoint_dir`` complete: list its files and sizes in :data:`COMPLETE_MARKER`, written to a
    temporary name, flushed to disk and renamed into place. Call it once every process has finished writing.

    Args:
        run: how the run was set up (:func:`llava.train.run_record.current_run_record`), recorded as ``run``.

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
    if run is not None:
        payload["run"] = run
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
    named = checkpoint_step(checkpoint_dir)
    if named is not None and named != step:
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


def read_run_record(checkpoint_dir: str | os.PathLike[str]) -> dict | None:
    """The ``run`` record of a checkpoint's completion marker, or ``None`` (no marker, or one written before
    runs were recorded)."""
    try:
        with open(os.path.join(os.fspath(checkpoint_dir), COMPLETE_MARKER), encoding="utf-8") as handle:
            run = json.load(handle).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return run if isinstance(run, dict) else None


def newest_complete_step(output_dir: str | os.PathLike[str]) -> int | None:
    """The step of the newest complete checkpoint of ``output_dir``, or ``None``."""
    path, _ = find_resume_checkpoint(output_dir)
    return None if path is None else checkpoint_step(path)


def set_aside(path: str | os.PathLike[str], why: str) -> str:
    """Move checkpoint folder ``path`` into ``<its folder>/set_aside/`` (renamed ``<name>.<UTC time>``, with a
    ``set_aside_reason.txt``) so that no run resumes from it or rotates it away; log where it went and why.

    Returns:
        Its new path.
    """
    path = os.path.normpath(os.fspath(path))
    folder = os.path.join(os.path.dirname(path), SET_ASIDE_DIR)
    os.makedirs(folder, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = os.path.join(folder, f"{os.path.basename(path)}.{stamp}")
    suffix = 1
    while os.path.exists(target):
        target = os.path.join(folder, f"{os.path.basename(path)}.{stamp}.{suffix}")
        suffix += 1
    os.rename(path, target)
    _fsync_dir(os.path.dirname(path))
    try:
        with open(os.path.join(target, "set_aside_reason.txt"), "w", encoding="utf-8") as handle:
            handle.write(f"moved here from {path} on {stamp}: {why}\n")
    except OSError:
        pass  # the log line below says it too
    logger.warning("set %s aside as %s: %s", path, target, why)
    return target


def rotate_checkpoints(
    output_dir: str | os.PathLike[str],
    keep: int | None,
    protected: Collection[str] = (),
    just_written: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints (none without ``keep``), and every incomplete
    checkpoint whatever ``keep``: called right after this run completed a checkpoint, so an incomplete folder is a
    save that was killed, never work to keep. Neither ``just_written`` nor a ``protected`` folder (the best one) is
    ever deleted; a complete checkpoint newer than ``just_written`` belongs to a run this one rolled back from and
    is set aside (:func:`set_aside`), so that no later resume picks it.

    Returns:
        The deleted folders.
    """
    protected = {os.path.abspath(p) for p in (*protected, just_written or "") if p}
    newest_allowed = checkpoint_step(just_written) if just_written else None
    complete, incomplete = [], []
    for step, path in list_checkpoints(output_dir):
        problem = checkpoint_problem(path)
        if problem is None and newest_allowed is not None and step > newest_allowed:
            set_aside(path, f"newer than checkpoint-{newest_allowed}, which this run has just written after "
                            "resuming from an older checkpoint")
            continue
        (complete if problem is None else incomplete).append(path)
    if not complete:
        return []  # nothing was completed: an incomplete folder may be all there is to look at
    doomed = [(path, f"save_total_limit {keep}") for path in complete[:-keep]] if keep and keep > 0 else []
    doomed += [(path, "incomplete: its save did not finish") for path in incomplete]
    deleted = []
    for path, why in doomed:
        if os.path.abspath(path) in protected:
            continue
        logger.info("deleting checkpoint %s (%s)", path, why)
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


def main(argv: list[str] | None = None) -> int:
    """``python -m llava.train.checkpoints OUTPUT_DIR``: print the step of the newest complete checkpoint (nothing
    when there is none); the Slurm wrapper uses it to tell a restart that made progress."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m llava.train.checkpoints OUTPUT_DIR", file=sys.stderr)
        return 2
    step = newest_complete_step(args[0])
    if step is not None:
        print(step)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
