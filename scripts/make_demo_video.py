"""Render the project's synthetic demo video (``assets/demo.mp4``).

The clip shows simple solid shapes on a plain background so that it is tiny,
deterministic and easy to describe:

* a red square sliding from left to right,
* a blue circle sliding from top to bottom,
* a small yellow flash visible in exactly one frame (the middle one).

Usage::

    python scripts/make_demo_video.py [--out assets/demo.mp4] [--size 128] [--frames 32] [--fps 8]

Only PyAV and numpy are needed. The encoder is ``libx264`` (yuv420p) when the
local FFmpeg build provides it, ``mpeg4`` otherwise.
"""

from __future__ import annotations

import argparse
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

BACKGROUND_RGB = (235, 235, 225)
SQUARE_RGB = (220, 30, 30)
CIRCLE_RGB = (30, 60, 220)
FLASH_RGB = (250, 220, 0)


def flash_frame_index(frames: int) -> int:
    """Index of the single frame that contains the yellow flash."""
    return frames // 2


def render_demo_frames(size: int = 128, frames: int = 32) -> np.ndarray:
    """Draw the demo animation.

    Args:
        size: width and height of every frame in pixels (>= 16).
        frames: number of frames (>= 1).

    Returns:
        ``uint8`` array of shape ``[frames, size, size, 3]`` in RGB order.
    """
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")

    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    video[:] = BACKGROUND_RGB

    square = size // 5
    radius = size // 10
    flash = max(2, size // 16)
    yy, xx = np.mgrid[0:size, 0:size]
    # Progress in [0, 1] over the clip; a one-frame clip stays at the start.
    progress = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)

    for t, p in enumerate(progress):
        frame = video[t]

        # Red square: left -> right along the upper third.
        x0 = int(round(p * (size - square)))
        y0 = size // 6
        frame[y0 : y0 + square, x0 : x0 + square] = SQUARE_RGB

        # Blue circle: top -> bottom along the right third.
        cx = (3 * size) // 4
        cy = radius + int(round(p * (size - 2 * radius - 1)))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        frame[disc] = CIRCLE_RGB

        if t == flash_frame_index(frames):
            fy, fx = (3 * size) // 4, size // 4
            frame[fy : fy + flash, fx : fx + flash] = FLASH_RGB

    return video


def _pick_codec() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_demo_video(out: str | os.PathLike[str], size: int = 128, frames: int = 32, fps: int = 8) -> str:
    """Render the demo frames and encode them to ``out``.

    Args:
        out: destination path (parent directories are created).
        size: frame width/height in pixels; must be even for yuv420p.
        frames: number of frames.
        fps: frame rate of the written stream.

    Returns:
        The codec name that was used (``"libx264"`` or ``"mpeg4"``).
    """
    import av

    if size % 2:
        raise ValueError(f"size must be even for yuv420p, got {size}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")

    video = render_demo_frames(size, frames)
    codec = _pick_codec()
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    # bitexact keeps library version strings out of the file so reruns are byte-identical.
    with av.open(str(out_path), mode="w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps, 1))
        stream.width = size
        stream.height = size
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            # Single-threaded x264 keeps the bitstream reproducible across machines.
            stream.options = {"crf": "23", "preset": "medium", "threads": "1"}
        else:
            stream.bit_rate = 200_000
        for rgb in video:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return codec


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="assets/demo.mp4", help="output file (default: assets/demo.mp4)")
    parser.add_argument("--size", type=int, default=128, help="frame width and height in pixels")
    parser.add_argument("--frames", type=int, default=32, help="number of frames")
    parser.add_argument("--fps", type=int, default=8, help="frames per second")
    args = parser.parse_args(argv)

    codec = write_demo_video(args.out, size=args.size, frames=args.frames, fps=args.fps)
    nbytes = os.path.getsize(args.out)
    print(f"wrote {args.out}: {args.frames} frames {args.size}x{args.size} @ {args.fps} fps, {codec}, {nbytes} bytes")


if __name__ == "__main__":
    main()
