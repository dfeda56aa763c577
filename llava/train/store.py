"""The annotation store: every annotation file read once into a memory-mapped Arrow file, shared by every process.

A training process does not hold its samples as Python objects: each annotation file is streamed, validated and
written to ``<cache>/annotations-<key>/samples.arrow`` (Hugging Face ``datasets``' Arrow format), and every rank
and DataLoader worker of a node maps that file; the pages live once, in the page cache, and a sample becomes a
dict only when ``__getitem__`` asks for it. ``key`` hashes the file's bytes, the folders its relative media
paths are joined to and the store's format, so an edited file or other folders make a new store and an unchanged
one is reused by every later run.

The first process to need a store builds it while holding a lock (``filelock``), in a temporary folder renamed
into place once complete (``manifest.json``, written last, lists every file with its size): the other processes
wait for the lock and open the finished store, a killed build leaves only a temporary folder that is never
opened, and an annotation error found by the builder is recorded so that the waiting processes report it at once
instead of reading the file again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from array import array
from collections.abc import Callable
from typing import Any

import numpy as np

from .annotations import AnnotationError, iter_annotations

logger = logging.getLogger("llava.train.data")

__all__ = [
    "MODALITY_CODES",
    "AnnotationStore",
    "default_cache_dir",
    "file_digest",
    "open_annotation_store",
    "publish",
    "store_key",
]

STORE_FORMAT = 1
# Modality of a row, as stored: 0 text only, 1 image, 2 video.
MODALITY_CODES = {"text": 0, "image": 1, "video": 2}
MODALITY_NAMES = tuple(MODALITY_CODES)
_ROWS_PER_BATCH = 8192
_MANIFEST = "manifest.json"
_DIGEST_BLOCK = 1 << 22


def default_cache_dir() -> str:
    """``$SLOWFAST_DATA_CACHE``, else ``$XDG_CACHE_HOME/slowfast-llava/data`` (``~/.cache/...``)."""
    explicit = os.environ.get("SLOWFAST_DATA_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "slowfast-llava", "data")


def file_digest(path: str) -> str:
    """BLAKE2b of the file's bytes (hex)."""
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as handle:
        while block := handle.read(_DIGEST_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def store_key(*parts: Any) -> str:
    """A short hash of ``parts`` (JSON-serialisable), naming a store folder."""
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=12).hexdigest()


# --------------------------------------------------------------------------------------------
# Publication: built once, under a lock, renamed into place
# --------------------------------------------------------------------------------------------


def write_manifest(folder: str, fields: dict) -> None:
    """Write ``manifest.json`` listing every file of ``folder`` with its size (the last file a build writes)."""
    files = {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}
    with open(os.path.join(folder, _MANIFEST), "w", encoding="utf-8") as handle:
        json.dump(dict(fields, format=STORE_FORMAT, files=files), handle, indent=1)


def read_manifest(folder: str) -> dict | None:
    """The manifest of a complete store folder, or None when the folder is missing, incomplete or damaged."""
    try:
        with open(os.path.join(folder, _MANIFEST), encoding="utf-8") as handle:
            manifest = json.load(handle)
        if manifest.get("format") != STORE_FORMAT:
            return None
        for name, size in manifest["files"].items():
            if os.path.getsize(os.path.join(folder, name)) != size:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def _remove_dead_builds(final: str) -> None:
    """Temporary folders of builds on this host whose process is gone (killed mid-build)."""
    parent, name = os.path.split(final)
    host = socket.gethostname()
    for entry in os.listdir(parent):
        if not entry.startswith(f"{name}.tmp-{host}-"):
            continue
        pid = entry.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)
            continue  # still running (another build that does not share our lock)
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            continue
        logger.warning("removing %s, left by a build that did not finish", os.path.join(parent, entry))
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def publish(final: str, build: Callable[[str], None], describe: str) -> str:
    """Make sure the complete folder ``final`` exists: return it if it does, else build it once.

    ``build(tmp)`` writes the folder's files into ``tmp`` (which it creates) and calls :func:`write_manifest`
    last. Concurrent callers on one host (ranks, jobs) serialise on ``final + ".lock"``; the first builds,
    the others then find the finished folder. The folder appears by an atomic rename, so a build killed half-way
    is never taken for a complete one. An :class:`AnnotationError` raised by ``build`` is recorded next to the
    folder and raised again to every later caller (the key of the folder covers everything the error depends on).
    """
    from filelock import FileLock

    if read_manifest(final) is not None:
        return final
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the data cache folder '{parent}' ({err.strerror or err}); set --data_cache_dir") from None
    failure = final + ".error"
    started = time.monotonic()
    with FileLock(final + ".lock"):
        waited = time.monotonic() - started
        if read_manifest(final) is not None:
            if waited > 1:
                logger.info("%s: built by another process (waited %.0f s)", describe, waited)
            return final
        if os.path.exists(failure):
            with open(failure, encoding="utf-8") as handle:
                raise AnnotationError(handle.read())
        _remove_dead_builds(final)
        tmp = f"{final}.tmp-{socket.gethostname()}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build(tmp)
        except AnnotationError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            with open(failure + f".{os.getpid()}", "w", encoding="utf-8") as handle:
                handle.write(str(err))
            os.replace(failure + f".{os.getpid()}", failure)
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if read_manifest(final) is not None:  # another host built it meanwhile (a lock not shared across hosts)
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        if os.path.lexists(final):  # damaged or of another format: replaced
            stale = f"{final}.stale-{socket.gethostname()}-{os.getpid()}"
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if read_manifest(final) is None:
                raise
    return final


# --------------------------------------------------------------------------------------------
# One annotation file
# --------------------------------------------------------------------------------------------


def _features():
    from datasets import Features, Value

    return Features(
        {"conversations": Value("string"), "video": Value("string"), "image": Value("string"), "number": Value("int64")}
    )


def _build_annotation_store(tmp: str, path: str, digest: str, video_folder: str | None, image_folder: str | None) -> None:
    from datasets.arrow_writer import ArrowWriter

    os.makedirs(tmp)
    started = time.monotonic()
    hasher = hashlib.blake2b(digest_size=20)
    columns: dict[str, list] = {name: [] for name in ("conversations", "video", "image", "number")}
    modality = array("b")
    numbering = None
    writer = ArrowWriter(features=_features(), path=os.path.join(tmp, "samples.arrow"), writer_batch_size=_ROWS_PER_BATCH)
    try:
        for record in iter_annotations(path, video_folder=video_folder, image_folder=image_folder, on_bytes=hasher.update):
            sample = record.sample
            numbering = numbering or record.where.split()[0]
            columns["conversations"].append(
                json.dumps(sample["conversations"], ensure_ascii=False, separators=(",", ":"))
            )
            columns["video"].append(sample.get("video"))
            columns["image"].append(sample.get("image"))
            columns["number"].append(record.number)
            modality.append(MODALITY_CODES["video" if "video" in sample else "image" if "image" in sample else "text"])
            if len(modality) % _ROWS_PER_BATCH == 0:
                writer.write_batch(columns)
                columns = {name: [] for name in columns}
        if columns["number"]:
            writer.write_batch(columns)
        rows, _ = writer.finalize()
    finally:
        writer.close()
    if hasher.hexdigest() != digest:
        raise RuntimeError(f"{path} changed while it was being read; start again once it is complete")
    np.save(os.path.join(tmp, "modality.npy"), np.frombuffer(modality, dtype=np.int8))
    write_manifest(
        tmp,
        dict(annotation=path, digest=digest, video_folder=video_folder, image_folder=image_folder, rows=rows,
             numbering=numbering, seconds=round(time.monotonic() - started, 2)),
    )


class AnnotationStore:
    """One annotation file's samples, memory-mapped from its store folder.

    ``store.sample(row)`` is the row's sample as :func:`llava.train.annotations.load_annotations` gives it
    (``conversations``, and ``video`` or ``image`` with the resolved path); ``store.modality`` ``[rows]`` int8
    (see ``MODALITY_CODES``) and ``store.where(row)`` (``"file: line N"``) need no decoding.
    """

    def __init__(self, folder: str) -> None:
        from datasets import Dataset

        manifest = read_manifest(folder)
        if manifest is None:
            raise ValueError(f"'{folder}' is not a complete annotation store")
        self.folder = folder
        self.manifest = manifest
        self.annotation: str = manifest["annotation"]
        self.table = Dataset.from_file(os.path.join(folder, "samples.arrow")).data.table  # memory-mapped Arrow
        self.modality: np.ndarray = np.load(os.path.join(folder, "modality.npy"), mmap_mode="r")
        if len(self.modality) != self.table.num_rows or self.table.num_rows != manifest["rows"]:
            raise ValueError(f"'{folder}': {self.table.num_rows} rows, {len(self.modality)} modality entries")

    def __len__(self) -> int:
        return self.table.num_rows

    def sample(self, row: int) -> dict:
        record = self.table.slice(row, 1).to_pylist()[0]
        sample = {"conversations": json.loads(record["conversations"])}
        for key in ("video", "image"):
            if record[key] is not None:
                sample[key] = record[key]
        return sample

    def conversations(self, start: int, stop: int) -> list[list[dict]]:
        """The conversations of rows ``start`` to ``stop - 1``."""
        return [json.loads(text) for text in self.table.column("conversations").slice(start, stop - start).to_pylist()]

    def where(self, row: int) -> str:
        number = self.table.column("number")[row].as_py()
        return f"{self.annotation}: {self.manifest['numbering']} {number}"

    def __getstate__(self) -> dict:
        return {"folder": self.folder}  # spawned DataLoader workers map the files again

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])


def open_annotation_store(
    path: str | os.PathLike[str],
    *,
    video_folder: str | None = None,
    image_folder: str | None = None,
    cache_dir: str | None = None,
) -> AnnotationStore:
    """The store of one annotation file (built on first use; see the module's docstring).

    Raises:
        AnnotationError: as :func:`llava.train.annotations.load_annotations` (cannot read, parse or validate).
    """
    path = os.path.abspath(os.fspath(path))
    try:
        digest = file_digest(path)
    except OSError as err:
        raise AnnotationError(f"cannot read annotation file '{path}': {err.strerror or err}") from None
    folders = [os.path.abspath(f) if f else None for f in (video_folder, image_folder)]
    key = store_key("annotations", STORE_FORMAT, digest, folders)
    final = os.path.join(os.path.abspath(cache_dir or default_cache_dir()), f"annotations-{key}")
    describe = f"annotation store of {path}"
    built_now = read_manifest(final) is None
    started = time.monotonic()
    publish(final, lambda tmp: _build_annotation_store(tmp, path, digest, video_folder, image_folder), describe)
    store = AnnotationStore(final)
    if built_now:
        logger.info("%s: %d samples in %s (%.1f s)", describe, len(store), final, time.monotonic() - started)
    return store
