"""Video decoding: sampling 64 frames from a 60-second 720p video, three ways.

* ``decord``: ``llava.video.load_video(path, 64, backend="decord")`` (random access, ``get_batch``);
* ``pyav``: ``llava.video.load_video(path, 64, backend="pyav")`` (decodes in order up to the last wanted frame,
  converting only the wanted ones to RGB);
* ``sequential``: plain PyAV, decoding every frame and converting every frame to RGB, keeping the 64 wanted.

The benchmark renders its own video once with PyAV (moving shapes on a moving gradient, H.264 ``ultrafast``,
a keyframe every 250 frames like a typical camera or web video) and caches it under ``--cache-dir``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava.video import load_video, uniform_frame_indices

from .common import BenchResult, Column, RunContext, Table, best, median, timing_rule

NAME = "video"
TITLE = "Video decoding: 64 sampled frames from a 60 s 720p video"
BUILDS_RELEASED_MODEL = False  # independent of the model's shape


@dataclass(frozen=True)
class VideoSpec:
    """The rendered test video and how many frames to sample from it."""

    width: int
    height: int
    fps: int
    seconds: int
    keyframe_interval: int
    sampled_frames: int

    @property
    def total_frames(self) -> int:
        return self.fps * self.seconds

    def file_name(self, codec: str) -> str:
        return (
            f"synthetic_{self.width}x{self.height}_{self.seconds}s_{self.fps}fps_g{self.keyframe_interval}_{codec}.mp4"
        )


SPECS = {
    "smoke": VideoSpec(320, 192, 30, 4, 60, 16),
    "small": VideoSpec(1280, 720, 30, 60, 250, 64),
    "released": VideoSpec(1280, 720, 30, 60, 250, 64),
}


def _codec() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def render_video(path: Path, spec: VideoSpec) -> Path:
    """Write the test video to ``path`` (YUV 4:2:0, drawn directly in the Y/U/V planes so rendering is cheap)."""
    import av

    codec = _codec()
    width, height = spec.width, spec.height
    options = {"g": str(spec.keyframe_interval)}
    if codec == "libx264":
        options.update(preset="ultrafast", keyint_min=str(spec.keyframe_interval), sc_threshold="0")
    else:
        options.update(qscale="5")
    # background: a textured luma gradient twice the frame's width, scrolled a little every frame (the texture
    # gives the encoder real work and the file a bit rate closer to camera footage)
    noise = np.random.default_rng(0).integers(-24, 25, size=(height, 2 * width))
    ramp = np.arange(2 * width) * (150 / (2 * width)) + 50
    background = np.clip(ramp[None, :] + noise, 0, 255).astype(np.uint8)
    # packed yuv420p: Y (height rows), then U and V, each height/2 x width/2, stored as height/4 full-width rows
    plane = np.empty((height * 3 // 2, width), dtype=np.uint8)
    luma = plane[:height]
    u_plane = plane[height : height + height // 4].reshape(height // 2, width // 2)
    v_plane = plane[height + height // 4 :].reshape(height // 2, width // 2)
    boxes = [  # (size, speed x, speed y, Y value, U value; V = 255 - U)
        (height // 5, 7, 3, 230, 60),
        (height // 7, -5, 4, 20, 200),
        (height // 9, 11, -6, 160, 110),
    ]
    tmp = path.with_suffix(".partial.mp4")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(codec, rate=spec.fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.thread_type = "AUTO"
        for index in range(spec.total_frames):
            shift = (index * 3) % width
            luma[:] = background[:, shift : shift + width]
            plane[height:] = 128
            for size, vx, vy, y_value, u_value in boxes:
                x = (index * vx) % (width - size)
                y = (index * vy) % (height - size)
                luma[y : y + size, x : x + size] = y_value
                u_plane[y // 2 : (y + size) // 2, x // 2 : (x + size) // 2] = u_value
                v_plane[y // 2 : (y + size) // 2, x // 2 : (x + size) // 2] = 255 - u_value
            frame = av.VideoFrame.from_ndarray(plane, format="yuv420p")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def cached_video(cache_dir: Path, spec: VideoSpec, log: Callable[[str], None]) -> Path:
    """The rendered video for ``spec`` under ``cache_dir``, rendering it on first use."""
    path = cache_dir / spec.file_name(_codec())
    if not path.exists():
        start = time.perf_counter()
        render_video(path, spec)
        log(f"  rendered {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return path


def decode_sequential(path: Path, num_frames: int) -> np.ndarray:
    """Decode every frame with PyAV and convert each to RGB; return the ``num_frames`` uniformly sampled ones
    as ``uint8`` ``[num_frames, H, W, 3]``."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        total = stream.frames
        wanted = set(uniform_frame_indices(total, num_frames))
        kept = []
        for index, frame in enumerate(container.decode(stream)):
            rgb = frame.to_ndarray(format="rgb24")
            if index in wanted:
                kept.append(rgb)
    return np.stack(kept)


def run(ctx: RunContext) -> BenchResult:
    """Render (or reuse) the test video, then time the three decoders on it."""
    start = time.perf_counter()
    spec = SPECS[ctx.scale]
    path = cached_video(ctx.cache_dir, spec, ctx.log)
    count = spec.sampled_frames
    contenders = {
        "decord": lambda: load_video(path, count, backend="decord").frames,
        "pyav": lambda: load_video(path, count, backend="pyav").frames,
        "sequential": lambda: decode_sequential(path, count),
    }
    outputs = {name: fn() for name, fn in contenders.items()}  # warm-up (file cache, libraries)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(ctx.repeats):
        for name, fn in contenders.items():
            begin = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - begin)
    seconds = {name: best(values) for name, values in times.items()}
    rows = [
        dict(
            way=name,
            seconds=seconds[name],
            seconds_median=median(times[name]),
            sampled_fps=count / seconds[name],
            decoded_fps=spec.total_frames / seconds[name] if name == "sequential" else None,
            speedup_vs_sequential=seconds["sequential"] / seconds[name],
        )
        for name in contenders
    ]
    for row in rows:
        ctx.log(f"  {row['way']:10s} {row['seconds']:.3f} s, {row['sampled_fps']:.1f} sampled frames/s")
    # The three decoders should agree on the pixels (decoders may differ by rounding in the colour conversion).
    reference = outputs["sequential"].astype(np.int16)
    mismatch = {name: float(np.abs(out.astype(np.int16) - reference).mean()) for name, out in outputs.items()}
    summary = {
        "decord_seconds": seconds["decord"],
        "pyav_seconds": seconds["pyav"],
        "sequential_seconds": seconds["sequential"],
        "decord_sampled_fps": count / seconds["decord"],
        "pyav_sampled_fps": count / seconds["pyav"],
        "sequential_sampled_fps": count / seconds["sequential"],
        "decord_speedup_vs_sequential": seconds["sequential"] / seconds["decord"],
        "pyav_speedup_vs_sequential": seconds["sequential"] / seconds["pyav"],
        "decord_vs_pyav_seconds": seconds["decord"] / seconds["pyav"],
        "decord_mean_abs_pixel_diff": mismatch["decord"],
        "pyav_mean_abs_pixel_diff": mismatch["pyav"],
    }
    size_mib = path.stat().st_size / 2**20
    notes = [
        (
            f"Video: {spec.width}x{spec.height}, {spec.fps} fps, {spec.seconds} s ({spec.total_frames} frames), "
            f"{_codec()} with a keyframe every {spec.keyframe_interval} frames, {size_mib:.1f} MiB; synthetic "
            "content (shapes on a scrolling textured gradient) may decode faster than camera footage, so absolute "
            "rates are optimistic."
        ),
        (
            f"{count} frames sampled uniformly (numpy.linspace over all frames, as at inference); "
            f"{timing_rule(ctx.repeats)} after a warm-up run on {ctx.device_name}. decord runs with 1 thread (as "
            "llava.video sets it), PyAV with FFmpeg's automatic threading."
        ),
        (
            f"Mean absolute pixel difference from the sequential decode: decord {mismatch['decord']:.2f}, "
            f"pyav {mismatch['pyav']:.2f} (of 255)."
        ),
    ]
    return BenchResult(
        name=NAME,
        title=TITLE,
        device=ctx.device_name,
        scale=ctx.scale,
        setup=dict(video=spec.__dict__, file=path.name, size_mib=size_mib, codec=_codec(), repeats=ctx.repeats),
        tables=[
            Table(
                title=f"Sampling {count} of {spec.total_frames} frames ({spec.width}x{spec.height}), {ctx.device_name}",
                columns=[
                    Column("way", "decoder"),
                    Column("seconds", "seconds", "{:.3f}"),
                    Column("sampled_fps", "sampled frames/s", "{:.1f}"),
                    Column("decoded_fps", "decoded frames/s", "{:.0f}"),
                    Column("speedup_vs_sequential", "speed-up vs. sequential", "{:.2f}x"),
                ],
                rows=rows,
            )
        ],
        summary=summary,
        notes=notes,
        seconds=time.perf_counter() - start,
    )
