"""Hostile media the gate tests write, and a watch that tells whether a file was opened by anyone.

:class:`OpenWatch` sees opens made by this process's Python code (an audit hook) and by C code such as FFmpeg
or decord inside it or in a child process (Linux inotify, through ctypes), so a test can show that a file a
playlist names is never read.
"""

from __future__ import annotations

import ctypes
import os
import sys
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.refusals import one_keyframe_video  # noqa: E402

IN_ACCESS = 0x001
IN_OPEN = 0x020
_python_opens: list[str] = []
_hook_installed = False


def _audit(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _python_opens.append(os.fsdecode(args[0]))


class OpenWatch:
    """Records every open of ``paths`` from now on: ``opened()`` lists the ones opened."""

    def __init__(self, *paths: Path) -> None:
        global _hook_installed
        if not _hook_installed:  # audit hooks cannot be removed; one records for every watch
            sys.addaudithook(_audit)
            _hook_installed = True
        self.paths = [Path(p).resolve() for p in paths]
        self._start = len(_python_opens)
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self._fd >= 0, f"inotify_init1 failed (errno {ctypes.get_errno()})"
        self._watches = {}
        for path in self.paths:
            wd = libc.inotify_add_watch(self._fd, str(path).encode(), IN_OPEN | IN_ACCESS)
            assert wd >= 0, f"inotify_add_watch({path}) failed (errno {ctypes.get_errno()})"
            self._watches[wd] = path

    def opened(self) -> list[Path]:
        """The watched paths opened (by C code or Python) since the watch began."""
        seen = set()
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            data = b""
        offset = 0
        while offset + 16 <= len(data):
            wd, _mask, _cookie, length = np.frombuffer(data[offset : offset + 16], dtype=np.uint32).tolist()
            seen.add(self._watches.get(int(np.int32(np.uint32(wd)))))
            offset += 16 + length
        for name in _python_opens[self._start :]:
            resolved = Path(name).resolve()
            if resolved in self.paths:
                seen.add(resolved)
        return sorted(p for p in seen if p is not None)

    def close(self) -> None:
        os.close(self._fd)


def write_one_keyframe_video(path: Path, frames: int, size: int = 16, keyframe_every: int | None = None) -> Path:
    """An H.264 MP4 (no B-frames) of ``frames`` still frames of ``size`` x ``size`` with a single keyframe (every
    frame depends on the one before: sampling the last frame means decoding them all), or one every
    ``keyframe_every`` frames."""
    return one_keyframe_video(path, frames, size, size, keyframe_every, noise=False)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def write_png_bomb(path: Path, side: int = 13000) -> Path:
    """A valid grey PNG of ``side`` x ``side`` black pixels (169 M pixels at 13000), about 170 KB on disk."""
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit greyscale
    compressor = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + pixels
    chunks = [compressor.compress(row * 500) for _ in range(side // 500)]
    chunks.append(compressor.compress(row * (side % 500)))
    chunks.append(compressor.flush())
    data = b"".join(chunks)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data)
                     + _png_chunk(b"IEND", b""))
    return path


def assert_stopped() -> None:
    """The media gate's latest overrunning decode was killed (its worker process is gone) and none is running."""
    from llava import media_gate

    assert media_gate.busy_workers() == 0
    assert media_gate._STOPPED, "no decode was stopped"
    assert not Path(f"/proc/{media_gate._STOPPED[-1]}").exists(), "the stopped worker is still there"

