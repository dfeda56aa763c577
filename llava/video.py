"""Video input: frame sampling and decoding for the video LLM.

The main entry point is :func:`load_video`, which accepts

* a video file, decoded with decord (default) or PyAV,
* an animated GIF (a video, decoded with PyAV; its frame times come from its per-frame delays),
* a single image file, including a one-frame GIF (treated as a one-frame video),
* a directory of image frames (treated as a video, frames sorted naturally),

and returns a :class:`VideoClip` holding ``uint8`` RGB frames of shape
``[T, H, W, 3]`` together with the source indices and timing metadata.
Frames come out upright: a file's display-matrix rotation (phone videos) is
applied. Frame times are the frames' presentation times, so they are right for
variable-frame-rate files too. Everything runs on the CPU. Any unreadable input
raises :class:`VideoLoadError` whose message names the path and the cause.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from llava import media_gate
from llava.video_index import PacketIndex, VideoLoadError, read_packet_index, valid_fps

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


@dataclass
class VideoClip:
    """Frames sampled from one video plus where and when they come from.

    Attributes:
        frames: ``uint8`` array ``[T, H, W, 3]``, RGB, upright.
        frame_indices: length-``T`` list of indices into the source frames
            (in presentation order, counted from 0).
        video_fps: average frame rate of the source (frames per second).
        total_frames: number of frames in the source.
        duration: length of the source in seconds: from the first frame's
            presentation time to the end of the last frame when the decoder
            reports frame times, else ``total_frames / video_fps``.
        backend: what decoded it: ``"decord"``, ``"pyav"``, ``"image"`` or ``"frames-folder"``.
        path: the input path as given.
        timestamps: presentation time in seconds of each sampled frame,
            measured from the first frame of the source (length ``T``), or
            ``None`` when the decoder gave none (then :attr:`frame_times`
            assumes a constant frame rate).
    """

    frames: np.ndarray
    frame_indices: list[int]
    video_fps: float
    total_frames: int
    duration: float
    backend: str
    path: str
    timestamps: list[float] | None = None

    @property
    def frame_times(self) -> list[float]:
        """Time in seconds of each sampled frame (length ``T``): :attr:`timestamps`, or ``index / video_fps``."""
        if self.timestamps is not None:
            return list(self.timestamps)
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
    # The ratio first, as the reference computes it: (i + 1) * count / num_frames rounds the other way at
    # some ties (e.g. 104 candidates for 96 frames).
    ratio = count / num_frames
    return [candidates[round((i + 1) * ratio - 1)] for i in range(num_frames)]


def load_video(
    path: str | os.PathLike[str],
    max_frames: int = 64,
    *,
    fps: float | None = None,
    backend: str = "auto",
    limits: Any = None,
) -> VideoClip:
    """Decode a sampled subset of frames from a video, an image, or a frames folder.

    Every input passes :mod:`llava.media_gate` first, within ``limits`` (a :class:`~llava.media_gate.MediaLimits`;
    default :data:`~llava.media_gate.DEFAULT_LIMITS`).

    Args:
        path: video file, animated GIF, single image file, or directory of image frames.
        max_frames: most frames to return.
        fps: ``None`` samples ``max_frames`` frames uniformly
            (:func:`uniform_frame_indices`); a number samples at that rate,
            capped at ``max_frames`` (:func:`fps_frame_indices`). For a frames
            folder it is instead the folder's frame rate (default 1) and
            sampling stays uniform.
        backend: ``"auto"`` (decord, falling back to PyAV when decord is not
            installed or fails on this file), ``"decord"`` or ``"pyav"``.
            Ignored for images and frames folders; animated GIFs always use
            PyAV (decord cannot read GIFs).

    Returns:
        A :class:`VideoClip` whose ``frames`` are ``uint8`` ``[T, H, W, 3]`` RGB,
        turned upright by the file's display-matrix rotation (to the nearest
        quarter turn; decord 0.6 fails on quarter-turned files, so ``"auto"``
        decodes those with PyAV), and whose ``frame_times`` are the frames'
        presentation times.

    Raises:
        VideoLoadError: the input is missing, empty, undecodable, has no
            frames, or ``max_frames`` / ``fps`` is not positive;
            :class:`~llava.media_gate.MediaRefused` (a subclass) when the gate refuses it.
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

    limits = media_gate.DEFAULT_LIMITS if limits is None else limits
    if not os.path.exists(path_str):
        raise VideoLoadError(path_str, "file does not exist")
    if os.path.isdir(path_str):
        return _load_frames_folder(path_str, max_frames, fps, limits)
    if os.path.getsize(path_str) == 0:
        raise VideoLoadError(path_str, "file is empty (0 bytes)")
    info = media_gate.probe(path_str, limits, as_image=_is_image(path_str))  # refuses before any frame is read
    if limits.max_decode_seconds is not None:
        return media_gate.run_with_deadline(
            _decode_vetted, (path_str, info, max_frames, fps, backend, limits.without_deadline()),
            limits.max_decode_seconds, path_str,
        )
    return _decode_vetted(path_str, info, max_frames, fps, backend, limits)


def _decode_vetted(path_str: str, info: Any, max_frames: int, fps: float | None, backend: str, limits: Any) -> VideoClip:
    """Decode a file :func:`llava.media_gate.probe` accepted (``info``) within ``limits``."""
    if info.kind == "image":
        return _load_image(path_str, limits)
    media_gate.check_decode_work(path_str, lambda total, rate: _select_indices(total, rate, max_frames, fps), limits)
    with media_gate.vetted(info, limits):
        if backend == "pyav" or info.animated:  # decord cannot read GIFs
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


def _read_rgb_image(path: str, shown_path: str, limits: Any) -> np.ndarray:
    """Decode one image (checked by :func:`llava.media_gate.open_image`) to ``uint8`` ``[H, W, 3]`` RGB; errors
    name ``shown_path``."""
    with media_gate.open_image(path, limits, shown_path) as image:
        try:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError) as err:
            where = "" if path == shown_path else f" frame '{os.path.basename(path)}':"
            raise VideoLoadError(shown_path, f"cannot decode image{where} {err}") from err


def _load_image(path: str, limits: Any) -> VideoClip:
    frame = _read_rgb_image(path, path, limits)
    return VideoClip(
        frames=frame[None],
        frame_indices=[0],
        video_fps=1.0,
        total_frames=1,
        duration=0.0,
        backend="image",
        path=path,
    )


def _load_frames_folder(path: str, max_frames: int, fps: float | None, limits: Any) -> VideoClip:
    names = sorted(
        (n for n in os.listdir(path) if _is_image(n) and os.path.isfile(os.path.join(path, n))),
        key=_natural_key,
    )
    if not names:
        raise VideoLoadError(path, "directory contains no image frames")
    media_gate.check_frame_count(path, len(names), limits)
    video_fps = float(fps) if fps is not None else 1.0
    indices = uniform_frame_indices(len(names), max_frames)
    frames = [_read_rgb_image(os.path.join(path, names[i]), path, limits) for i in indices]
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
        reader = decord.VideoReader(os.path.abspath(path), ctx=decord.cpu(0), num_threads=1)
        total = len(reader)
        video_fps = valid_fps(reader.get_avg_fps())
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
    timestamps, duration = _decord_times(reader, indices, total)
    return VideoClip(
        frames=np.ascontiguousarray(frames, dtype=np.uint8),
        frame_indices=indices,
        video_fps=video_fps,
        total_frames=total,
        duration=duration if duration is not None else total / video_fps,
        backend="decord",
        path=path,
        timestamps=timestamps,
    )


def _decord_times(reader: Any, indices: list[int], total: int) -> tuple[list[float] | None, float | None]:
    """The sampled frames' times and the video's duration in seconds, from decord's per-frame presentation times.

    decord reports each frame as ``[start, end]`` seconds (``end`` is ``start`` plus the frame's duration);
    times are measured from frame 0's start. ``(None, None)`` when decord gives no usable times.
    """
    try:
        spans = np.asarray(reader.get_frame_timestamp(list(indices)), dtype=np.float64).reshape(-1, 2)
        first = np.asarray(reader.get_frame_timestamp([0]), dtype=np.float64).reshape(-1, 2)[0, 0]
        last_end = np.asarray(reader.get_frame_timestamp([total - 1]), dtype=np.float64).reshape(-1, 2)[0, 1]
    except Exception as err:  # older decord builds lack the method or fail on odd files
        logger.debug("decord gave no frame times (%s); assuming a constant frame rate", err)
        return None, None
    if len(spans) != len(indices) or not np.isfinite(spans).all() or not np.isfinite([first, last_end]).all():
        return None, None
    # decord stores times as float32; round away the noise below a microsecond
    times = [round(float(start - first), 6) for start in spans[:, 0]]
    duration = round(float(last_end - first), 6)
    return times, duration if duration > 0 else None


# --------------------------------------------------------------------------- PyAV


class _Decoded(NamedTuple):
    """One decoded frame: ``uint8`` ``[H, W, 3]`` RGB, upright, and its time in seconds from the first frame
    (``None`` when the decoder gave the frame no presentation time)."""

    image: np.ndarray
    time: float | None


def _quarter_turns(frame: Any) -> int:
    """Counter-clockwise quarter turns that make ``frame`` upright, from its display matrix (0 without one)."""
    try:
        angle = float(frame.rotation)  # degrees counter-clockwise, from the frame's DISPLAYMATRIX side data
    except (AttributeError, TypeError, ValueError):
        return 0
    if not np.isfinite(angle):
        return 0
    return round(angle / 90) % 4


def _upright_rgb(frame: Any) -> np.ndarray:
    """``uint8`` ``[H, W, 3]`` RGB of a decoded PyAV frame, rotated as its display matrix says."""
    image = frame.to_ndarray(format="rgb24")
    turns = _quarter_turns(frame)
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def _open(path: str) -> Any:
    """The file as a PyAV container, opened through the media gate (:func:`llava.media_gate.open_container`)."""
    return media_gate.open_container(path)


def _load_with_pyav(path: str, max_frames: int, fps: float | None) -> VideoClip:
    import av

    try:
        with _open(path) as container:
            if not container.streams.video:
                raise VideoLoadError(path, "no decodable video stream")
            stream = container.streams.video[0]
            video_fps = (
                valid_fps(stream.average_rate) or valid_fps(stream.guessed_rate) or valid_fps(stream.base_rate)
            )
            if video_fps is None:
                raise VideoLoadError(path, "video reports no frame rate")
            stream_frames = int(stream.frames or 0)
            try:
                index = read_packet_index(container, stream, valid_fps(stream.base_rate) or video_fps)
            except av.FFmpegError as err:  # e.g. a damaged tail: decode in order, as far as the frames go
                logger.debug("cannot index the packets of %s (%s); decoding it sequentially", path, err)
                index = None

        if index is not None:
            total = len(index.frame_pts)
        else:
            # Container metadata may omit the frame count (0) or overstate it; in
            # either case the decoded count is the truth.
            total = stream_frames if stream_frames > 0 else _pyav_count_frames(path)
        if total <= 0:
            raise VideoLoadError(path, "video has 0 frames")

        indices = _select_indices(total, video_fps, max_frames, fps)
        sought = _pyav_seek_decode(path, index, indices) if index is not None else None
        if sought is not None:
            found = sought[0]
        else:
            if index is not None:
                logger.debug("seeking in %s was unreliable; decoding it sequentially", path)
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

    times = [found[i].time for i in indices]
    return VideoClip(
        frames=np.stack([found[i].image for i in indices]),
        frame_indices=indices,
        video_fps=video_fps,
        total_frames=total,
        duration=index.duration if index is not None and index.duration > 0 else total / video_fps,
        backend="pyav",
        path=path,
        timestamps=None if any(t is None for t in times) else times,
    )


def _pyav_count_frames(path: str) -> int:
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def _pyav_decode_indices(path: str, indices: list[int]) -> tuple[dict[int, _Decoded], int]:
    """Decode sequentially from the start, keeping only ``indices``; stop after the last one.

    The fallback when seeking is impossible or unreliable, and the definition of which frame an index names.
    Returns the kept frames by index and how many frames were decoded in total.
    """
    wanted = set(indices)
    last = max(indices)
    found: dict[int, _Decoded] = {}
    decoded = 0
    first_pts: int | None = None
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        time_base = stream.time_base
        for index, frame in enumerate(container.decode(stream)):
            decoded = index + 1
            if index == 0:
                first_pts = frame.pts
            if index in wanted:
                time = None
                if frame.pts is not None and first_pts is not None and time_base:
                    time = float((frame.pts - first_pts) * time_base)
                found[index] = _Decoded(_upright_rgb(frame), time)
            if index >= last:
                break
    return found, decoded


def _pyav_seek_decode(path: str, index: PacketIndex, indices: list[int]) -> tuple[dict[int, _Decoded], int] | None:
    """Decode the frames ``indices`` by seeking: for each, jump to the keyframe it needs
    (:meth:`PacketIndex.start_keyframe`) unless the decoder is already past it, then decode forward to it.

    The decoder is fed exactly the packets that sequential decoding would feed it from that keyframe on, so the
    frames are the ones :func:`_pyav_decode_indices` returns, pixel for pixel. Returns the kept frames by index
    and how many packets were decoded, or ``None`` when the container cannot land on the keyframe or the
    decoder's output does not match the index (the caller then decodes sequentially).
    """
    frame_of_pts = {pts: number for number, pts in enumerate(index.frame_pts)}
    position_of_pts = {pts: position for position, pts in enumerate(index.packet_pts)}
    wanted = set(indices)
    found: dict[int, _Decoded] = {}
    decoded = 0
    first_pts = index.frame_pts[0]
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        time_base = stream.time_base
        packets: Any = container.demux(stream)
        position = -1  # position of the last packet sent to the decoder
        run_start = 0  # position of the keyframe the decoder started from
        for target in sorted(wanted):
            if target in found:
                continue
            key = index.start_keyframe(target)
            if position + 1 < key or key < run_start:
                packets = _seek_to_keyframe(container, stream, index, key, position_of_pts)
                if packets is None:
                    return None
                position, run_start = key - 1, key
            # Frames shown before the keyframe a run started from (an open GOP's leading frames) may be
            # broken: their references were never decoded.
            earliest = index.packet_pts[run_start] if run_start > 0 else None
            while target not in found:
                packet = next(packets, None)
                if packet is None:
                    return None  # the stream ended before the target came out
                if not (packet.size == 0 and packet.pts is None):  # else: the final, draining packet
                    if position_of_pts.get(packet.pts) != position + 1:
                        return None  # not the packet sequential decoding would feed next
                    position += 1
                    decoded += 1
                for frame in stream.decode(packet):
                    number = frame_of_pts.get(frame.pts)
                    if number is None:
                        return None  # a frame the index does not know
                    if number in wanted and number not in found and (earliest is None or frame.pts >= earliest):
                        time = float((frame.pts - first_pts) * time_base)
                        found[number] = _Decoded(_upright_rgb(frame), time)
    return found, decoded


def _seek_to_keyframe(
    container: Any, stream: Any, index: PacketIndex, key: int, position_of_pts: dict[int, int]
) -> Any:
    """Seek so that demuxing resumes at the keyframe packet at position ``key``.

    Demuxers differ in which timestamp they seek by (MP4 and Matroska land on the keyframe given its
    presentation time, MPEG-TS by its decode time, and only roughly), so this asks for the presentation time,
    then the decode time, skips (without decoding) packets before the keyframe and gives up if it lands after
    it. Returns an iterator of packets starting with the keyframe's, or ``None``.
    """
    import av

    timestamps = [index.packet_pts[key]]
    dts = index.packet_dts[key]
    if dts is not None and dts < timestamps[0]:
        timestamps.append(dts)
    for timestamp in timestamps:
        try:
            _seek(container, stream, timestamp)
        except av.FFmpegError:
            return None
        packets = container.demux(stream)
        for packet in packets:
            position = position_of_pts.get(packet.pts) if packet.pts is not None else None
            if position is None or position > key:
                break  # landed after the keyframe (or somewhere unknown): try an earlier timestamp
            if position == key:
                return _prepend(packet, packets)
    return None


def _seek(container: Any, stream: Any, timestamp: int) -> None:
    """Seek ``container`` to the keyframe at or before ``timestamp`` (``stream.time_base`` units); flushes the
    decoder."""
    container.seek(timestamp, stream=stream, backward=True, any_frame=False)


def _prepend(first: Any, rest: Any) -> Any:
    yield first
    yield from rest
