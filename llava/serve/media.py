"""Videos and images named in API requests: where their bytes come from, and decoding them within limits.

A request names a medium by URL: a ``data:`` URL carrying the file itself (``data:video/mp4;base64,...``,
``data:image/png;base64,...``), or, only when the operator named a media root, a ``file://`` URL or a plain path
inside that folder. Remote ``http(s)://`` URLs are never fetched. :func:`resolve_media` turns the URL into a
:class:`MediaSource` (bytes or a checked path, plus the SHA-256 of the content, the key of the video cache);
:func:`probe_media` reads its header through the media gate (:mod:`llava.media_gate`: allowed containers and
codecs, size, duration and frame bounds) without decoding, and :func:`decode_media` decodes it with
:func:`llava.video.load_video` within the same limits (decoding work and time included). Every refusal is a
:class:`MediaError` whose message says what is wrong with which part.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import mimetypes
import os
import re
import tempfile
from dataclasses import dataclass
from collections.abc import Callable
from urllib.parse import unquote, urlparse

from llava.media_gate import MediaInfo, MediaLimits, MediaRefused, probe
from llava.video import IMAGE_EXTENSIONS, VideoClip, VideoLoadError, load_video

__all__ = [
    "MediaError",
    "MediaSource",
    "decode_media",
    "media_path",
    "probe_media",
    "resolve_media",
]

# Suffixes load_video needs to tell images from videos (it goes by the extension); others come from mimetypes.
_SUFFIXES = {
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
    "video/x-matroska": ".mkv",
    "video/x-msvideo": ".avi",
    "video/mpeg": ".mpg",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "image/bmp": ".bmp",
    "image/tiff": ".tiff",
}
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),(?P<data>.*)", re.DOTALL)
_HASH_CHUNK = 1 << 20


class MediaError(ValueError):
    """A medium the server will not read. ``status`` is the HTTP status to answer with (400, 403 outside the
    media root, or 413 over a limit); ``param`` names the request field (``messages[0].content[1].video_url``);
    ``code`` is the error's machine-readable tag."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.status = status
        self.code = code or ("invalid_media" if status == 400 else "media_too_large" if status == 413 else None)


@dataclass
class MediaSource:
    """Where a medium's bytes are: ``data`` (from a data URL) or ``path`` (a checked file under the media root).

    ``digest`` is the SHA-256 of the content in hex; ``suffix`` the file extension used to decode ``data``;
    ``kind`` is ``"video"`` or ``"image"`` (an image is decoded as one frame); ``param`` names the request field.
    """

    kind: str
    param: str
    digest: str
    suffix: str
    data: bytes | None = None
    path: str | None = None


def _suffix_for(mime: str, param: str) -> str:
    mime = mime.lower()
    suffix = _SUFFIXES.get(mime) or mimetypes.guess_extension(mime, strict=False)
    if suffix:
        return suffix
    if mime.startswith("video/"):
        return ".video"  # the decoders sniff the container; only an image extension would change the path taken
    raise MediaError(f"{param}: unsupported media type '{mime}'", param)


def _parse_data_url(url: str, kind: str, param: str, max_bytes: int) -> MediaSource:
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise MediaError(f"{param}: malformed data URL (expected data:<type>;base64,<data>)", param)
    mime = (match["mime"] or "").lower()
    params = [p.strip().lower() for p in match["params"].split(";") if p.strip()]
    if not mime.startswith(("video/", "image/")):
        raise MediaError(f"{param}: the data URL's type must be video/* or image/*, got '{mime or 'none'}'", param)
    if kind == "image" and not mime.startswith("image/"):
        raise MediaError(f"{param}: an image_url must hold an image, got '{mime}': send videos as video_url", param)
    if "base64" not in params:
        raise MediaError(f"{param}: the data URL must be base64-encoded (data:{mime};base64,...)", param)
    encoded = match["data"]
    # 4 base64 characters carry 3 bytes: refuse before decoding anything far too large
    if len(encoded) // 4 * 3 > max_bytes + 3:
        raise MediaError(
            f"{param}: the {kind} is about {len(encoded) // 4 * 3 / 2**20:.1f} MiB, over the limit of "
            f"{max_bytes / 2**20:.1f} MiB", param, status=413,
        )
    try:
        data = base64.b64decode("".join(encoded.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{param}: the data URL is not valid base64", param) from None
    if not data:
        raise MediaError(f"{param}: the data URL is empty", param)
    if len(data) > max_bytes:
        raise MediaError(
            f"{param}: the {kind} is {len(data) / 2**20:.1f} MiB, over the limit of {max_bytes / 2**20:.1f} MiB",
            param, status=413,
        )
    return MediaSource(kind, param, hashlib.sha256(data).hexdigest(), _suffix_for(mime, param), data=data)


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _local_file(url: str, kind: str, param: str, media_root: str | None, max_bytes: int) -> MediaSource:
    if media_root is None:
        raise MediaError(
            f"{param}: this server reads no files: send the {kind} as a data URL (data:...;base64,...), or start "
            "the server with --media-root FOLDER to allow paths inside that folder", param,
        )
    if url.startswith("file:"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(f"{param}: file URLs on other hosts are not read", param)
        name = unquote(parsed.path)
    else:
        name = url
    root = os.path.realpath(media_root)
    # realpath follows symbolic links, so a link inside the root cannot point the server outside it
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise MediaError(f"{param}: '{name}' is outside the server's media root", param, status=403)
    if not os.path.isfile(path):
        raise MediaError(f"{param}: '{name}' is not a file in the server's media root", param)
    size = os.path.getsize(path)
    if size > max_bytes:
        raise MediaError(
            f"{param}: '{name}' is {size / 2**20:.1f} MiB, over the limit of {max_bytes / 2**20:.1f} MiB",
            param, status=413,
        )
    return MediaSource(kind, param, _file_digest(path), os.path.splitext(path)[1], path=path)


def resolve_media(url: str, kind: str, param: str, media_root: str | None, max_bytes: int) -> MediaSource:
    """The bytes behind ``url`` (a ``video_url`` when ``kind == "video"``, an ``image_url`` when ``"image"``).

    Raises :class:`MediaError` for a remote URL, a malformed or oversized data URL, a path when no media root
    is set, a path outside ``media_root`` (status 403), or a missing file.
    """
    if kind not in ("video", "image"):
        raise ValueError(f"kind must be 'video' or 'image', got {kind!r}")
    url = url.strip()
    if not url:
        raise MediaError(f"{param}: the URL is empty", param)
    scheme = url.split(":", 1)[0].lower() if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", url) else ""
    if scheme == "data":
        return _parse_data_url(url, kind, param, max_bytes)
    if scheme in ("http", "https", "ftp", "s3", "gs"):
        raise MediaError(
            f"{param}: this server does not fetch remote URLs ({scheme}://): send the {kind} as a data URL", param
        )
    if scheme not in ("", "file") and len(scheme) > 1:  # one letter: a Windows drive, leave it to the path check
        raise MediaError(f"{param}: unsupported URL scheme '{scheme}:'", param)
    return _local_file(url, kind, param, media_root, max_bytes)


def media_path(source: MediaSource, on_close: Callable[[Callable[[], None]], None]) -> str:
    """A file holding ``source``: its path under the media root, or a temporary file (with the suffix that makes
    :func:`~llava.video.load_video` take it for a video or an image) whose removal is handed to ``on_close``."""
    if source.path is not None:
        return source.path
    handle, temp_path = tempfile.mkstemp(prefix="llava-api-", suffix=source.suffix)
    on_close(lambda: _unlink(temp_path))
    with os.fdopen(handle, "wb") as out:
        out.write(source.data or b"")
    return temp_path


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _refusal(source: MediaSource, err: VideoLoadError, path: str) -> MediaError:
    """The :class:`MediaError` for an error of the loader: 413 over a numeric limit of the gate, 400 for a
    refused format or an unreadable file; it names the request field and leaves the server's path out."""
    cause = _short(err.cause, path)
    if isinstance(err, MediaRefused):
        over_limit = err.limit.startswith("max_")
        return MediaError(f"{source.param}: the {source.kind} is refused ({cause})", source.param,
                          status=413 if over_limit else 400, code=None if over_limit else "unsupported_media")
    return MediaError(f"{source.param}: cannot read the {source.kind} ({cause})", source.param)


def probe_media(source: MediaSource, path: str, limits: MediaLimits) -> MediaInfo:
    """The header of ``source`` (stored at ``path``), checked by the media gate; no frame is decoded.
    Raises :class:`MediaError`."""
    as_image = os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS
    try:
        return probe(path, limits, as_image=as_image)
    except VideoLoadError as err:
        raise _refusal(source, err, path) from err


def decode_media(source: MediaSource, path: str, frames: int, fps: float | None, limits: MediaLimits,
                 budget_bytes: int) -> VideoClip:
    """Decode ``source`` (stored at ``path``) through :func:`~llava.video.load_video` within ``limits``: an
    image as one frame, a video as up to ``frames`` frames (``fps``: at that rate). Decoded frames over
    ``budget_bytes`` (the header said less) are refused (413). Raises :class:`MediaError`."""
    try:
        clip = load_video(path, frames if source.kind == "video" else 1,
                          fps=fps if source.kind == "video" else None, limits=limits)
    except VideoLoadError as err:
        raise _refusal(source, err, path) from err
    if clip.frames.nbytes > budget_bytes:
        raise MediaError(f"{source.param}: the decoded frames take {clip.frames.nbytes / 2**20:.1f} MiB, more than "
                         "their header announced", source.param, status=413)
    return clip


def _short(err: BaseException | str, path: str) -> str:
    """One line of at most 300 characters, with the server-side path (a temporary file) left out."""
    text = " ".join(str(err).replace(f"'{path}'", "the file").replace(path, "the file").split())
    text = text or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."

