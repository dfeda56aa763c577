"""The media gate: what every entry point checks before a video or image is decoded.

:func:`llava.video.load_video` (and so the CLI, the web demo, the API server, the lmms-eval plugin and
training) passes every file through here first:

* **Containers.** FFmpeg opens a file only with a demuxer of :attr:`MediaLimits.containers` (MP4/MOV,
  Matroska/WebM, AVI, MPEG-TS/PS, FLV, GIF by default), enforced by FFmpeg itself (``format_whitelist``,
  checked after probing and before the demuxer reads its header) with the ``file`` protocol only. Formats that
  name other files or URLs (concat scripts, HLS/DASH playlists, image sequences) are never opened, so nothing
  they reference is read. Later opens of the same file are forced to the demuxer found here (no new probing).
* **Codecs** of :attr:`MediaLimits.codecs`, checked before a frame is decoded; images decode with Pillow,
  restricted to :attr:`MediaLimits.image_formats`.
* **Header bounds**, before decoding: width, height, pixels per frame (decompression bombs), duration and
  frame count.
* **Decoding work**: :attr:`MediaLimits.max_decode_frames` bounds the frames the decoder must decode to reach
  the sampled ones (predicted from the keyframe positions, so a long file with one keyframe is refused
  before it is decoded), and :attr:`MediaLimits.max_decode_seconds` runs the decoding in a worker process that
  is killed when it overruns (:func:`run_with_deadline`), whichever backend decodes.

Each refusal is a :class:`MediaRefused` (a :class:`~llava.video_index.VideoLoadError`) naming the file and the limit.
The defaults (:data:`DEFAULT_LIMITS`) only refuse what no training set holds; what comes from the network gets
:data:`UPLOAD_LIMITS` (the API server moves each bound with an option).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import math
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llava.video_index import VideoLoadError, read_packet_index, valid_fps

__all__ = [
    "DEFAULT_CODECS",
    "DEFAULT_CONTAINERS",
    "DEFAULT_IMAGE_FORMATS",
    "DEFAULT_LIMITS",
    "MediaInfo",
    "MediaLimits",
    "MediaRefused",
    "UPLOAD_LIMITS",
    "busy_workers",
    "check_decode_work",
    "check_frame_count",
    "open_container",
    "open_image",
    "probe",
    "run_with_deadline",
]

# Demuxer names as FFmpeg spells them (a demuxer is allowed when any of its comma-separated names is listed).
DEFAULT_CONTAINERS: frozenset[str] = frozenset(
    {"mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "mpegts", "mpeg", "flv", "gif"}
)
# Codec names (the codec, not the decoder: ``stream.codec_context.name``).
DEFAULT_CODECS: frozenset[str] = frozenset({
    "h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "msmpeg4v2", "msmpeg4v3", "msmpeg4", "mpeg1video",
    "mpeg2video", "mjpeg", "h263", "gif", "theora", "vc1", "wmv3", "prores", "png",
})
DEFAULT_IMAGE_FORMATS: tuple[str, ...] = ("BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP")
# What the first bytes of a refused file say it is, for the error message.
_SIGNATURES = (
    (b"ffconcat", "an FFmpeg concat script (it names other files)"),
    (b"#EXTM3U", "an HLS playlist (it names other files or URLs)"),
    (b"<?xml", "an XML document (a DASH manifest names other files or URLs)"),
    (b"<MPD", "a DASH manifest (it names other files or URLs)"),
    (b"\x89PNG", "a PNG image, not a video"),
    (b"\xff\xd8\xff", "a JPEG image, not a video"),
)
# The first bytes of formats that name other files or URLs (the first four signatures above).
_REFERENCING = tuple(signature for signature, _ in _SIGNATURES[:4])
_MAX_STREAMS = 64
_STARTUP_TIMEOUT_S = 60.0


class MediaRefused(VideoLoadError):
    """The gate refused a file: ``limit`` names the :class:`MediaLimits` field (or ``"containers"``,
    ``"codecs"``, ``"image_formats"``) that refused it; the message names the file, the value and the limit."""

    def __init__(self, path: str | os.PathLike[str], cause: str, limit: str) -> None:
        self.limit = limit
        super().__init__(path, cause)


def _positive_or_none(name: str, value: Any, kind: type) -> None:
    if value is None:
        return
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"MediaLimits.{name} must be a positive integer or None, got {value!r}")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"MediaLimits.{name} must be a positive number or None, got {value!r}")


@dataclass(frozen=True)
class MediaLimits:
    """What the gate lets through; ``None`` switches a bound off.

    Attributes:
        containers: FFmpeg demuxer names allowed to open a video.
        codecs: video codec names allowed to be decoded.
        image_formats: Pillow format names allowed for still images.
        max_side: most pixels of a frame's (or image's) width or height.
        max_pixels: most pixels of one frame or image (width x height).
        max_duration_s: longest video, in seconds, as its header says.
        max_source_frames: most frames in a video file (from the header, else duration x frame rate).
        max_decode_frames: most frames the decoder may have to decode to reach the sampled frames (predicted
            from the keyframe positions before decoding).
        max_decode_seconds: a decode still running after this long is stopped (it runs in a child process,
            which is killed).
    """

    containers: frozenset[str] = DEFAULT_CONTAINERS
    codecs: frozenset[str] = DEFAULT_CODECS
    image_formats: tuple[str, ...] = DEFAULT_IMAGE_FORMATS
    max_side: int | None = 16384
    max_pixels: int | None = 8192 * 8192
    max_duration_s: float | None = 12 * 3600.0
    max_source_frames: int | None = 4_000_000
    max_decode_frames: int | None = None
    max_decode_seconds: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_side", "max_pixels", "max_source_frames", "max_decode_frames"):
            _positive_or_none(name, getattr(self, name), int)
        for name in ("max_duration_s", "max_decode_seconds"):
            _positive_or_none(name, getattr(self, name), float)
        object.__setattr__(self, "containers", frozenset(self.containers))
        object.__setattr__(self, "codecs", frozenset(self.codecs))
        object.__setattr__(self, "image_formats", tuple(self.image_formats))
        for name in ("containers", "codecs", "image_formats"):
            if not getattr(self, name) or not all(isinstance(n, str) and n for n in getattr(self, name)):
                raise ValueError(f"MediaLimits.{name} must be a non-empty collection of names")

    def without_deadline(self) -> MediaLimits:
        """The same limits with ``max_decode_seconds`` off (what the child process that decodes applies)."""
        return replace(self, max_decode_seconds=None)


DEFAULT_LIMITS = MediaLimits()
# For files that come from the network (the API server's defaults, the web demo's uploads): a decode time limit,
# a bound on the decoding work, and frames of at most 4096 x 4096.
UPLOAD_LIMITS = MediaLimits(
    max_side=8192, max_pixels=4096 * 4096, max_duration_s=3 * 3600.0, max_source_frames=3 * 3600 * 60,
    max_decode_frames=20_000, max_decode_seconds=30.0,
)


@dataclass(frozen=True)
class MediaInfo:
    """What a file's header says, read without decoding a frame.

    ``kind`` is ``"video"`` or ``"image"``; ``container`` the demuxer (its first name, e.g. ``"mov"``) or the
    Pillow format; ``frames`` and ``duration`` are ``None`` when the header does not say.
    """

    kind: str
    container: str
    codec: str
    width: int
    height: int
    frames: int | None = None
    fps: float | None = None
    duration: float | None = None
    animated: bool = field(default=False)


# ------------------------------------------------------------------------------------------------ opening

_VETTED_FORMAT: contextvars.ContextVar[tuple[str, frozenset[str]] | None] = contextvars.ContextVar(
    "llava_media_gate_vetted_format", default=None
)


@contextlib.contextmanager
def vetted(info: MediaInfo, limits: MediaLimits) -> Iterator[None]:
    """Within the block, :func:`open_container` forces the demuxer :func:`probe` found (no probing again)."""
    token = _VETTED_FORMAT.set((info.container, limits.containers))
    try:
        yield
    finally:
        _VETTED_FORMAT.reset(token)


def _allowed(demuxer: str, allowed: frozenset[str]) -> bool:
    return any(name in allowed for name in demuxer.split(","))


def open_container(path: str, limits: MediaLimits | None = None) -> Any:
    """``av.open`` for reading with FFmpeg's protections on: only the ``file`` protocol, only the allowed
    demuxers (inside :func:`vetted`: exactly the vetted one), at most 64 streams.

    Raises ``av.FFmpegError`` (``EINVAL``) when the file is not in an allowed container.
    """
    import av

    vetted_format = _VETTED_FORMAT.get()
    allowed = (limits or DEFAULT_LIMITS).containers if vetted_format is None else vetted_format[1]
    options = {
        "protocol_whitelist": "file",
        "format_whitelist": ",".join(sorted(allowed)),
        "max_streams": str(_MAX_STREAMS),
    }
    # An absolute path so that no part of the name is read as a protocol ("concat:a|b").
    target = os.path.abspath(path)
    if vetted_format is not None:
        return av.open(target, format=vetted_format[0], container_options=options)
    return av.open(target, container_options=options)


def _file_head(path: str) -> bytes:
    """The first bytes of ``path`` after a byte-order mark and white space (empty when unreadable)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    except OSError:
        return b""


def _what_it_looks_like(path: str) -> str:
    head = _file_head(path)
    for signature, description in _SIGNATURES:
        if head.startswith(signature):
            return f": the file is {description}"
    return ""


def open_image(path: str, limits: MediaLimits | None = None, shown_path: str | None = None) -> Any:
    """Open ``path`` with Pillow (header only; pixels load on first use), refusing a format outside
    :attr:`MediaLimits.image_formats` or a size over :attr:`MediaLimits.max_side` / ``max_pixels``.

    ``shown_path`` is the name used in errors (a frames folder's path for one of its frames). The caller
    closes the image. Raises :class:`MediaRefused` or :class:`~llava.video_index.VideoLoadError`.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    limits = limits or DEFAULT_LIMITS
    shown = shown_path or path
    where = "" if shown == path else f" frame '{os.path.basename(path)}':"
    try:
        with warnings.catch_warnings():  # the size is checked below, against the caller's limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path, formats=list(limits.image_formats))
    except Image.DecompressionBombError as err:
        raise MediaRefused(shown, f"image{where} {err}", "max_pixels") from err
    except UnidentifiedImageError as err:
        raise MediaRefused(
            shown, f"cannot decode image{where} it is not an image in one of the allowed formats "
                   f"({', '.join(limits.image_formats)})", "image_formats",
        ) from err
    except (OSError, ValueError) as err:
        raise VideoLoadError(shown, f"cannot decode image{where} {err}") from err
    try:
        _check_size(shown, f"image{where}", image.width, image.height, limits)
    except MediaRefused:
        image.close()
        raise
    return image


def _check_size(path: str, what: str, width: int, height: int, limits: MediaLimits) -> None:
    if width <= 0 or height <= 0:
        raise VideoLoadError(path, f"{what} has no frame size in its header")
    if limits.max_pixels is not None and width * height > limits.max_pixels:
        raise MediaRefused(
            path, f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of "
                  f"{limits.max_pixels:,} (max_pixels)", "max_pixels",
        )
    if limits.max_side is not None and max(width, height) > limits.max_side:
        raise MediaRefused(
            path, f"{what} is {width}x{height}, over the limit of {limits.max_side} pixels a side (max_side)",
            "max_side",
        )


# ------------------------------------------------------------------------------------------------ probing


def probe(path: str, limits: MediaLimits | None = None, *, as_image: bool = False) -> MediaInfo:
    """Read ``path``'s header and check it against ``limits``; no frame is decoded.

    ``as_image`` opens it with Pillow (the caller decided it is a still image, by its name); a GIF with several
    frames comes back as ``kind="video"`` and is then probed as a video. Raises :class:`MediaRefused` for
    a refused container, codec, size, duration or frame count, :class:`~llava.video_index.VideoLoadError` for
    an unreadable file.
    """
    limits = limits or DEFAULT_LIMITS
    if as_image:
        with open_image(path, limits) as image:
            frames = int(getattr(image, "n_frames", 1) or 1)
            info = MediaInfo("image", image.format or "", image.format or "", image.width, image.height, frames=1)
        if frames <= 1 or info.container != "GIF":
            return info
    return _probe_video(path, limits)


def _probe_video(path: str, limits: MediaLimits) -> MediaInfo:
    import av

    try:
        with open_container(path, limits) as container:
            if not container.streams.video:
                raise VideoLoadError(path, "no decodable video stream")
            stream = container.streams.video[0]
            demuxer = container.format.name
            codec = stream.codec_context.name or ""
            width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate and float(rate) > 0 else None
            duration = None
            if stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            elif container.duration:
                duration = container.duration / 1_000_000
            frames = int(stream.frames) if stream.frames else None
    except VideoLoadError:
        raise
    except av.FFmpegError as err:
        if getattr(err, "errno", None) == 22:  # EINVAL: FFmpeg's "format not on whitelist"
            raise MediaRefused(
                path, "not in an allowed container (allowed demuxers: "
                      f"{', '.join(sorted(limits.containers))}){_what_it_looks_like(path)}", "containers",
            ) from err
        raise VideoLoadError(path, f"decoder error: {err.strerror or err}") from err
    except (OSError, ValueError, RuntimeError) as err:
        raise VideoLoadError(path, f"decoder error: {err}") from err
    if not _allowed(demuxer, limits.containers):  # FFmpeg enforced it already; never trust one layer alone
        raise MediaRefused(path, f"the container '{demuxer}' is not allowed", "containers")
    # decord opens the file without a whitelist: a file that also reads as a playlist (by its first bytes) could be
    # probed as one there, whatever FFmpeg picked here among the allowed demuxers
    if _file_head(path).startswith(_REFERENCING):
        raise MediaRefused(path, f"it begins like a playlist{_what_it_looks_like(path)}", "containers")
    if codec not in limits.codecs:
        raise MediaRefused(
            path, f"the video codec '{codec or 'unknown'}' is not allowed (allowed: {', '.join(sorted(limits.codecs))})",
            "codecs",
        )
    _check_size(path, "each frame", width, height, limits)
    info = MediaInfo("video", demuxer.split(",")[0], codec, width, height, frames, fps, duration,
                     animated=demuxer == "gif")
    _check_length(path, info, limits)
    return info


def _check_length(path: str, info: MediaInfo, limits: MediaLimits) -> None:
    if limits.max_duration_s is not None and info.duration is not None and info.duration > limits.max_duration_s:
        raise MediaRefused(
            path, f"the video lasts {info.duration:,.1f} s, over the limit of {limits.max_duration_s:,.0f} s "
                  "(max_duration_s)", "max_duration_s",
        )
    frames = info.frames
    if frames is None and info.duration is not None and info.fps is not None:
        frames = math.ceil(info.duration * info.fps)
    if frames is not None:
        check_frame_count(path, frames, limits)


def check_frame_count(path: str, frames: int, limits: MediaLimits) -> None:
    """Refuse a video (or frames folder) of more than :attr:`MediaLimits.max_source_frames` frames."""
    if limits.max_source_frames is not None and frames > limits.max_source_frames:
        raise MediaRefused(
            path, f"the video has {frames:,} frames, over the limit of {limits.max_source_frames:,} "
                  "(max_source_frames)", "max_source_frames",
        )


def check_decode_work(path: str, wanted: Callable[[int, float], list[int]], limits: MediaLimits) -> None:
    """Refuse ``path`` when decoding the frames ``wanted(total_frames, fps)`` would decode more than
    :attr:`MediaLimits.max_decode_frames` frames.

    The count follows the keyframes: each wanted frame is reached from the last keyframe before it unless the
    decoder is already between them (as PyAV's seeking decode does; decord seeks alike). A file whose packets
    cannot be indexed is counted as decoded from the start. Only the packets are read (no decoding).
    """
    limit = limits.max_decode_frames
    if limit is None:
        return

    import av

    with open_container(path, limits) as container:
        stream = container.streams.video[0]
        fps = valid_fps(stream.average_rate) or valid_fps(stream.guessed_rate) or valid_fps(stream.base_rate)
        if fps is None:
            return  # load_video refuses it with its own message
        try:
            index = read_packet_index(container, stream, fps)
        except av.FFmpegError:  # a damaged tail: the decoder reads what it can in order, as counted below
            index = None
        total = len(index.frame_pts) if index is not None else int(stream.frames or 0)
        if total <= 0:  # no index and no count in the header (Matroska has none): the duration says how many
            duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else (
                container.duration / 1_000_000 if container.duration else 0.0)
            total = math.ceil(duration * fps)
    if total <= 0:
        raise MediaRefused(
            path, "its frame count cannot be known before decoding (no packet index, frame count or duration), so "
                  f"the decoding work cannot be bounded (max_decode_frames: {limit:,})", "max_decode_frames",
        )
    targets = sorted(set(wanted(total, fps)))
    if index is None:
        work = targets[-1] + 1
    else:
        work, position, run_start = 0, -1, 0
        for target in targets:
            key = index.start_keyframe(target)
            if position + 1 < key or key < run_start:  # a seek: decoding restarts at the keyframe
                position, run_start = key - 1, key
            packet = index.frame_position[target]
            if packet > position:
                work += packet - position
                position = packet
    if work > limit:
        raise MediaRefused(
            path, f"sampling {len(targets)} of its {total:,} frames means decoding {work:,} frames (its keyframes "
                  f"are too far apart), over the limit of {limit:,} (max_decode_frames)", "max_decode_frames",
        )


# ------------------------------------------------------------------------------------------------ deadline

_STOPPED: list[int] = []  # process ids of decoding workers killed at their deadline (the latest last)


def _serve(conn: Any) -> None:
    """A decoding worker's loop: take ``(target, args)``, say it started, send back the result or the error."""
    while True:
        try:
            target, args = conn.recv()
        except EOFError:  # the parent is gone
            return
        conn.send(("started", None))
        try:
            result = target(*args)
        except VideoLoadError as err:
            conn.send(("refused" if isinstance(err, MediaRefused) else "unreadable",
                       (err.path, err.cause, getattr(err, "limit", None))))
        except Exception as err:  # noqa: BLE001 - sent as text: arbitrary exceptions do not always pickle
            conn.send(("error", f"{type(err).__name__}: {err}"))
        else:
            conn.send(("ok", result))


def worker_main() -> None:
    """Entry point of a decoding worker process (``sys.argv[1]``: the file descriptor of its socket)."""
    from multiprocessing.connection import Connection

    import av  # noqa: F401 - imported before the first job, whose deadline must not pay for it

    with contextlib.suppress(ImportError):
        import decord  # noqa: F401
    conn = Connection(int(sys.argv[1]))
    conn.send(("ready", None))
    _serve(conn)


class _Worker:
    """A process that decodes for this one, one job at a time, and is killed when a job overruns.

    A fresh interpreter (``python -c``) rather than a ``multiprocessing`` child: it does not import the
    parent's main module (a server's: torch and the model code), and daemonic processes may start it.
    """

    def __init__(self) -> None:
        from multiprocessing.connection import Connection

        mine, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[1])  # the folder holding the llava package
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        code = "from llava.media_gate import worker_main; worker_main()"
        with theirs:
            self.process = subprocess.Popen([sys.executable, "-c", code, str(theirs.fileno())], env=env,
                                            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL)
        self.conn = Connection(mine.detach())
        self.ready = False

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.conn.close()

    def run(self, target: Callable[..., Any], args: tuple[Any, ...], seconds: float, path: str) -> tuple[str, Any]:
        """``(status, payload)`` of ``target(*args)``; kills the worker and refuses on an overrun."""
        try:
            if not self.ready:
                if not self.conn.poll(_STARTUP_TIMEOUT_S):
                    raise VideoLoadError(path, "the decoding process did not start")
                self.conn.recv()  # ("ready", None)
                self.ready = True
            self.conn.send((target, args))
            if not self.conn.poll(_STARTUP_TIMEOUT_S):
                raise VideoLoadError(path, "the decoding process did not take the job")
            self.conn.recv()  # ("started", None): the deadline counts from here
            if not self.conn.poll(seconds):
                _STOPPED.append(self.process.pid)
                raise MediaRefused(
                    path, f"decoding took longer than {seconds:g} s and was stopped (max_decode_seconds)",
                    "max_decode_seconds",
                )
            return self.conn.recv()
        except (EOFError, OSError):
            raise VideoLoadError(path, f"the decoding process died (exit code {self.process.poll()})") from None


class _Workers:
    """Idle decoding workers kept for the next job (at most ``keep``); busy ones are counted."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.idle: list[_Worker] = []
        self.busy = 0
        self.lock = threading.Lock()
        atexit.register(self.close)
        os.register_at_fork(after_in_child=self._forget_after_fork)

    def _forget_after_fork(self) -> None:
        # A forked child (a DataLoader worker) must not talk to its parent's workers: two processes on one socket
        # would read each other's answers. It starts its own when it decodes.
        for worker in self.idle:
            worker.conn.close()  # the child's copies of the parent's sockets; the parent's stay open
        self.idle, self.busy, self.lock = [], 0, threading.Lock()

    def take(self) -> _Worker:
        with self.lock:
            self.busy += 1
            while self.idle:
                worker = self.idle.pop()
                if worker.process.poll() is None:
                    return worker
        try:
            return _Worker()
        except BaseException:
            with self.lock:
                self.busy -= 1
            raise

    def give_back(self, worker: _Worker | None) -> None:
        with self.lock:
            self.busy -= 1
            if worker is not None and len(self.idle) < self.keep:
                self.idle.append(worker)
                return
        if worker is not None:
            worker.kill()

    def close(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for worker in idle:
            worker.kill()


_WORKERS = _Workers()


def busy_workers() -> int:
    """Decoding workers running a job now."""
    with _WORKERS.lock:
        return _WORKERS.busy


def run_with_deadline(target: Callable[..., Any], args: tuple[Any, ...], seconds: float, path: str) -> Any:
    """``target(*args)`` in a decoding worker process, killed if it has not finished ``seconds`` after it began.

    ``target`` must be a module-level function (it is pickled by name); its result comes back pickled.
    Starting a worker is not counted in ``seconds``; idle workers are kept for later jobs. Raises
    :class:`MediaRefused` (``max_decode_seconds``) on an overrun; a :class:`~llava.video_index.VideoLoadError` raised
    by ``target`` is raised again here.
    """
    worker: _Worker | None = _WORKERS.take()
    try:
        status, payload = worker.run(target, args, seconds, path)
    except BaseException:
        worker.kill()
        worker = None
        raise
    finally:
        _WORKERS.give_back(worker)
    if status == "ok":
        return payload
    if status == "refused":
        raise MediaRefused(*payload)
    if status == "unreadable":
        raise VideoLoadError(payload[0], payload[1])
    raise VideoLoadError(path, f"decoder error: {payload}")
