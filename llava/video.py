"""Video input: frame sampling and decoding for the video LLM.

The main entry point is :func:`load_video`, which accepts

* a video file, decoded with decord (default) or PyAV,
* a single image file (treated as a one-frame video),
* a directory of image frames (treated as a video, frames sorted naturally),

and returns a :class:`VideoClip` holding ``uint8`` RGB frames of shape
``[T, H, W, 3]`` together with the source indices and timing metadata.
Everything runs on the CPU. Any unreadable input raises
:class:`VideoLoadError` whose message names the path and the cause.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "VideoClip",
    "VideoLoadError",
    "fps_frame_indices",
    "load_video",
    "uniform_frame_indices",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
_BACKENDS = ("auto", "decord", "pyav")


class VideoLoadError(ValueError):
    """The input could not be read as a video; the message names the path and the cause."""

    def __init__(self, path: str | os.PathLike[str], cause: str) -> None:
        self.path = os.fspath(path)
        self.cause = cause
        super().__init__(f"cannot read video '{self.path}': {cause}")


@dataclass
class VideoClip:
    """Frames sampled from one video plus where and when they come from.

    Attributes:
        frames: ``uint8`` array ``[T, H, W, 3]``, RGB.
        frame_indices: length-``T`` list of indices into the source frames.
        video_fps: frame rate of the source (frames per second).
        total_frames: number of frames in the source.
        duration: length of the source in seconds (``total_frames / video_fps``).
        backend: what decoded it: ``"decord"``, ``"pyav"``, ``"image"`` or ``"frames-folder"``.
        path: the input path as given.
    """

    frames: np.ndarray
    frame_indices: list[int]
    video_fps: float
    total_frames: int
    duration: float
    backend: str
    path: str

    @property
    def frame_times(self) -> list[float]:
        """Timestamp in seconds of each sampled frame (length ``T``)."""
        return [index / self.video_fps for index in self.frame_indices]

    def info(self) -> str:
        """One-line description of the duration and frame timestamps, for use in a prompt."""
        count = len(self.frame_indices)
        times = ",".join(f"{t:.2f}s" for t in self.frame_times)
        sampled = "1 frame is" if count == 1 else f"{count} frames are"
        return (
            f"The video lasts for {self.duration:.2f} seconds, and {sampled} uniformly "
            f"sampled from it. These frames are located at {times}."
        )


def uniform_frame_indices(total_frames: int, max_frames: int) -> list[int]:
    """Pick ``max_frames`` evenly spaced frame indices, first and last included.

    Equals ``numpy.linspace(0, total_frames - 1, max_frames, dtype=int)`` when
    ``total_frames >= max_frames``. A shorter video yields every frame exactly
    once (``list(range(total_frames))``) rather than repeating frames.

    Raises:
        ValueError: if ``total_frames`` or ``max_frames`` is not positive.
    """
    if total_frames <= 0:
        raise ValueError(f"total_frames must be positive, got {total_frames}")
    if max_frames <= 0:
        raise ValueError(f"max_frames must be positive, got {max_frames}")
    if total_frames < max_frames:
        return list(range(total_frames))
    return [int(i) for i in np.linspace(0, total_frames - 1, max_frames, dtype=int)]


def fps_frame_indices(total_frames: int, video_fps: float, fps: float, num_frames: int) -> list[int]:
    """Training-time sampling at (roughly) a target frame rate, capped at ``num_frames``.

    1. ``step = round(video_fps / min(fps, video_fps))``, at least 1, so a
       target above the source rate keeps every frame.
    2. Candidates are ``0, step, 2 * step, ...`` below ``total_frames``.
    3. If there are more than ``num_frames`` candidates (``L`` of them), keep
       ``candidates[round((i + 1) * L / num_frames - 1)]`` for
       ``i = 0 .. num_frames - 1``: evenly spread, always ending at the last
       candidate.

    Example: a 30 fps video at ``fps=4`` gives ``step = round(7.5) = 8``.

    Raises:
        ValueError: if any argument is not positive.
    """
    if total_frames <= 0:
        raise ValueError(f"total_frames must be positive, got {total_frames}")
    if video_fps <= 0:
        raise ValueError(f"video_fps must be positive, got {video_fps}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    step = max(1, round(video_fps / min(fps, video_fps)))
    candidates = list(range(0, total_frames, step))
    count = len(candidates)
    if count <= num_frames:
        return candidates
    return [candidates[round((i + 1) * count / num_frames - 1)] for i in range(num_frames)]


def load_video(
    path: str | os.PathLike[str],
    max_frames: int = 64,
    *,
    fps: float | None = None,
    backend: str = "auto",
) -> VideoClip:
    """Decode a sampled subset of frames from a video, an image, or a frames folder.

    Args:
        path: video file, single image file, or directory of image frames.
        max_frames: most frames to return.
        fps: ``None`` samples ``max_frames`` frames uniformly
            (:func:`uniform_frame_indices`); a number samples at that rate,
            capped at ``max_frames`` (:func:`fps_frame_indices`). For a frames
            folder it is instead the folder's frame rate (default 1) and
            sampling stays uniform.
        backend: ``"auto"`` (decord, falling back to PyAV when decord is not
            installed or fails on this file), ``"decord"`` or ``"pyav"``.
            Ignored for images and frames folders.

    Returns:
        A :class:`VideoClip` whose ``frames`` are ``uint8`` ``[T, H, W, 3]`` RGB.

    Raises:
        VideoLoadError: the input is missing, empty, undecodable, has no
            frames, or ``max_frames`` / ``fps`` is not positive.
        ValueError: ``backend`` is not one of the names above.
        ImportError: ``backend="decord"`` was requested but decord is not installed.
    """
    path_str = os.fspath(path)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if not isinstance(max_frames, (int, np.integer)) or max_frames <= 0:
        raise VideoLoadError(path_str, f"max_frames must be a positive integer, got {max_frames!r}")
    max_frames = int(max_frames)
    if fps is not None and not fps > 0:
        raise VideoLoadError(path_str, f"fps must be positive, got {fps!r}")

    if not os.path.exists(path_str):
        raise VideoLoadError(path_str, "file does not exist")
    if os.path.isdir(path_str):
        return _load_frames_folder(path_str, max_frames, fps)
    if os.path.getsize(path_str) == 0:
        raise VideoLoadError(path_str, "file is empty (0 bytes)")
    if _is_image(path_str):
        return _load_image(path_str)

    if backend == "pyav":
        return _load_with_pyav(path_str, max_frames, fps)
    if backend == "decord":
        return _load_with_decord(_import_decord(required=True), path_str, max_frames, fps)

    decord = _import_decord(required=False)
    if decord is not None:
        try:
            return _load_with_decord(decord, path_str, max_frames, fps)
        except VideoLoadError as err:
            logger.debug("decord failed on %s (%s); retrying with PyAV", path_str, err.cause)
    return _load_with_pyav(path_str, max_frames, fps)


# --------------------------------------------------------------------------- helpers


def _is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _natural_key(name: str) -> list[Any]:
    """Sort key so that ``2.jpg`` comes before ``10.jpg``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name)]


def _select_indices(total_frames: int, video_fps: float, max_frames: int, fps: float | None) -> list[int]:
    if fps is None:
        return uniform_frame_indices(total_frames, max_frames)
    return fps_frame_indices(total_frames, video_fps, fps, max_frames)


def _valid_fps(value: Any) -> float | None:
    try:
        rate = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return rate if np.isfinite(rate) and rate > 0 else None


def _read_rgb_image(path: str, shown_path: str) -> np.ndarray:
    """Decode one image to ``uint8`` ``[H, W, 3]`` RGB; errors name ``shown_path``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        where = "" if path == shown_path else f" frame '{os.path.basename(path)}':"
        raise VideoLoadError(shown_path, f"cannot decode image{where} {err}") from err


def _load_image(path: str) -> VideoClip:
    frame = _read_rgb_image(path, path)
    return VideoClip(
        frames=frame[None],
        frame_indices=[0],
        video_fps=1.0,
        total_frames=1,
        duration=0.0,
        backend="image",
        path=path,
    )


def _load_frames_folder(path: str, max_frames: int, fps: float | None) -> VideoClip:
    names = sorted(
        (n for n in os.listdir(path) if _is_image(n) and os.path.isfile(os.path.join(path, n))),
        key=_natural_key,
    )
    if not names:
        raise VideoLoadError(path, "directory contains no image frames")
    video_fps = float(fps) if fps is not None else 1.0
    indices = uniform_frame_indices(len(names), max_frames)
    frames = [_read_rgb_image(os.path.join(path, names[i]), path) for i in indices]
    shapes = {f.shape for f in frames}
    if len(shapes) > 1:
        raise VideoLoadError(path, f"frames have different sizes: {sorted(shapes)}")
    return VideoClip(
        frames=np.stack(frames),
        frame_indices=indices,
        video_fps=video_fps,
        total_frames=len(names),
        duration=len(names) / video_fps,
        backend="frames-folder",
        path=path,
    )


def _import_decord(required: bool) -> Any:
    try:
        import decord
    except ImportError:
        if required:
            raise ImportError("backend='decord' needs the decord package (pip install decord)") from None
        return None
    return decord


def _load_with_decord(decord: Any, path: str, max_frames: int, fps: float | None) -> VideoClip:
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        total = len(reader)
        video_fps = _valid_fps(reader.get_avg_fps())
    except Exception as err:  # decord raises DECORDError, RuntimeError, ... depending on the failure
        raise VideoLoadError(path, f"decoder error: {err}") from err
    if total <= 0:
        raise VideoLoadError(path, "video has 0 frames")
    if video_fps is None:
        raise VideoLoadError(path, "video reports no frame rate")

    indices = _select_indices(total, video_fps, max_frames, fps)
    try:
        batch = reader.get_batch(indices)
    except Exception as err:
        raise VideoLoadError(path, f"decoder error: {err}") from err
    # The returned type follows decord's global bridge (NDArray, torch tensor, ...);
    # convert without touching that global setting.
    if hasattr(batch, "asnumpy"):
        frames = batch.asnumpy()
    elif hasattr(batch, "numpy"):
        frames = batch.numpy()
    else:
        frames = np.asarray(batch)
    return VideoClip(
        frames=np.ascontiguousarray(frames, dtype=np.uint8),
        frame_indices=indices,
        video_fps=video_fps,
        total_frames=total,
        duration=total / video_fps,
        backend="decord",
        path=path,
    )


def _load_with_pyav(path: str, max_frames: int, fps: float | None) -> VideoClip:
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoLoadError(path, "no decodable video stream")
            stream = container.streams.video[0]
            video_fps = _valid_fps(stream.average_rate) or _valid_fps(stream.guessed_rate) or _valid_fps(stream.base_rate)
        if video_fps is None:
            raise VideoLoadError(path, "video reports no frame rate")

        # Container metadata may omit the frame count (0) or overstate it; in
        # either case the decoded count is the truth.
        total = int(stream.frames or 0)
        if total <= 0:
            total = _pyav_count_frames(path)
        if total <= 0:
            raise VideoLoadError(path, "video has 0 frames")

        indices = _select_indices(total, video_fps, max_frames, fps)
        found, decoded = _pyav_decode_indices(path, indices)
        if len(found) < len(indices):
            # The stream ended early, so ``decoded`` is the real frame count.
            if decoded <= 0:
                raise VideoLoadError(path, "video has 0 frames")
            total = decoded
            indices = _select_indices(total, video_fps, max_frames, fps)
            found, _ = _pyav_decode_indices(path, indices)
    except VideoLoadError:
        raise
    except av.FFmpegError as err:
        # str(err) repeats the path; strerror is just FFmpeg's reason.
        raise VideoLoadError(path, f"decoder error: {err.strerror or err}") from err
    except (OSError, ValueError, RuntimeError) as err:
        raise VideoLoadError(path, f"decoder error: {err}") from err

    return VideoClip(
        frames=np.stack([found[i] for i in indices]),
        frame_indices=indices,
        video_fps=video_fps,
        total_frames=total,
        duration=total / video_fps,
        backend="pyav",
        path=path,
    )


def _pyav_count_frames(path: str) -> int:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def _pyav_decode_indices(path: str, indices: list[int]) -> tuple[dict[int, np.ndarray], int]:
    """Decode sequentially, keeping only ``indices``; stop after the last one.

    Returns the kept frames by index (``uint8`` ``[H, W, 3]`` RGB) and how many
    frames were decoded in total.
    """
    import av

    wanted = set(indices)
    last = max(indices)
    found: dict[int, np.ndarray] = {}
    decoded = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            decoded = index + 1
            if index in wanted:
                found[index] = frame.to_ndarray(format="rgb24")
            if index >= last:
                break
    return found, decoded
