"""Video decoding: sampling 64 frames from a 5-minute 720p video, three ways.

* ``decord``: ``llava.video.load_video(path, 64, backend="decord")`` (indexes the packets, seeks, ``get_batch``);
* ``pyav``: ``llava.video.load_video(path, 64, backend="pyav")`` (indexes the packets, then for each wanted
  frame seeks to the keyframe it needs and decodes forward to it, converting only the wanted frames to RGB);
* ``sequential``: the PyAV path as it was before seeking: decode in order from the start up to the last wanted
  frame, converting only the wanted ones to RGB. Its cost grows with the video's length.

The benchmark renders its own video once with PyAV (moving shapes on a scrolling gradient, H.264 ``ultrafast``
at a low bit rate, a keyframe every 2 seconds as streaming encoders and phones write them) and caches it
under ``--cache-dir``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava.video import load_video, uniform_frame_indices

from .common import BenchResult, Check, Column, RunContext, Table, best, median, timing_rule

NAME = "video"
TITLE = "Video decoding: 64 sampled frames from a 5-minute 720p video"
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
    crf: int = 30  # x264 quality (higher: fewer bits)

    @property
    def total_frames(self) -> int:
        return self.fps * self.seconds

    def file_name(self, codec: str) -> str:
        return (
            f"synthetic_{self.width}x{self.height}_{self.seconds}s_{self.fps}fps_g{self.keyframe_interval}"
            f"_crf{self.crf}_{codec}.mp4"
        )


SPECS = {
    "smoke": VideoSpec(320, 192, 30, 4, 30, 16),
    "small": VideoSpec(1280, 720, 30, 300, 60, 64),
    "released": VideoSpec(1280, 720, 30, 300, 60, 64),
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
        options.update(preset="ultrafast", keyint_min=str(spec.keyframe_interval), sc_threshold="0", crf=str(spec.crf))
    else:
        options.update(qscale="5")
    # background: a textured luma gradient twice the frame's width, scrolled a little every frame (the texture
    # gives the encoder real work and the file a bit rate closer to camera footage)
    noise = np.random.default_rng(0).integers(-8, 9, size=(height, 2 * width))
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
    """The PyAV path before seeking: count frames from the container (``stream.frames``), then decode in order
    from the start, converting only the wanted frames to RGB and stopping after the last one; return the
    ``num_frames`` uniformly sampled frames as ``uint8`` ``[num_frames, H, W, 3]``."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        indices = uniform_frame_indices(stream.frames, num_frames)
        wanted, last = set(indices), indices[-1]
        kept = []
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                kept.append(frame.to_ndarray(format="rgb24"))
            if index >= last:
                break
    return np.stack(kept)


def index_seconds(path: Path) -> float:
    """Seconds the PyAV path spends reading the packet index (demuxing every packet, decoding none)."""
    import av

    from llava.video_index import read_packet_index

    begin = time.perf_counter()
    with av.open(str(path)) as container:
        read_packet_index(container, container.streams.video[0], None)
    return time.perf_counter() - begin


def frames_decoded(path: Path, num_frames: int) -> dict[str, int | None]:
    """How many frames each way decodes to sample ``num_frames`` uniformly (decord: not exposed)."""
    import av

    from llava.video import _pyav_seek_decode
    from llava.video_index import read_packet_index

    with av.open(str(path)) as container:
        index = read_packet_index(container, container.streams.video[0], None)
    if index is None:
        raise RuntimeError(f"{path}: PyAV cannot index this video's packets")
    indices = uniform_frame_indices(len(index.frame_pts), num_frames)
    sought = _pyav_seek_decode(str(path), index, indices)
    return {"decord": None, "pyav": None if sought is None else sought[1], "sequential": indices[-1] + 1}


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
    decoded = frames_decoded(path, count)
    rows = [
        dict(
            way=name,
            seconds=seconds[name],
            seconds_median=median(times[name]),
            sampled_fps=count / seconds[name],
            frames_decoded=decoded[name],
            decoded_fps=decoded[name] / seconds[name] if decoded[name] else None,
            speedup_vs_sequential=seconds["sequential"] / seconds[name],
        )
        for name in contenders
    ]
    for row in rows:
        ctx.log(f"  {row['way']:10s} {row['seconds']:.3f} s, {row['sampled_fps']:.1f} sampled frames/s")
    indexing = best([index_seconds(path) for _ in range(ctx.repeats)])
    # Seeking must give the sequential path's frames exactly; decord may differ by rounding in its colour
    # conversion.
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
        "pyav_vs_decord_seconds": seconds["pyav"] / seconds["decord"],
        "pyav_index_seconds": indexing,
        "pyav_frames_decoded": decoded["pyav"],
        "sequential_frames_decoded": decoded["sequential"],
        "decord_mean_abs_pixel_diff": mismatch["decord"],
        "pyav_mean_abs_pixel_diff": mismatch["pyav"],
        "pyav_frames_identical_to_sequential": float(np.array_equal(outputs["pyav"], outputs["sequential"])),
    }
    check = Check(
        target="PyAV (seeking) within 2x of decord's time",
        measured=summary["pyav_vs_decord_seconds"],
        limit=2.0,
        met=summary["pyav_vs_decord_seconds"] <= 2.0,
        reading=(
            f"PyAV {seconds['pyav']:.3f} s vs. decord {seconds['decord']:.3f} s "
            f"({summary['pyav_vs_decord_seconds']:.2f}x); sequential PyAV {seconds['sequential']:.3f} s"
        ),
    )
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
            f"The pyav time includes reading the packet index (every packet demuxed, none decoded; it gives the "
            f"frame count and each frame's time): {indexing:.3f} s alone. decord builds a similar index when it "
            "opens a file."
        ),
        (
            f"Mean absolute pixel difference from the sequential decode: decord {mismatch['decord']:.2f}, "
            f"pyav {mismatch['pyav']:.2f} (of 255); the seeking PyAV frames are "
            f"{'identical to' if summary['pyav_frames_identical_to_sequential'] else '**not** identical to'} the "
            "sequential ones."
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
                    Column("frames_decoded", "frames decoded", "{}"),
                    Column("decoded_fps", "decoded frames/s", "{:.0f}"),
                    Column("speedup_vs_sequential", "speed-up vs. sequential", "{:.2f}x"),
                ],
                rows=rows,
            )
        ],
        summary=summary,
        checks=[check],
        notes=notes,
        seconds=time.perf_counter() - start,
    )
