"""Tests for llava.video (frame sampling and decoding) and the demo video (playground/demo_video.py)."""

from __future__ import annotations

import os
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from llava import video as video_mod
from llava.video_index import PacketIndex, read_packet_index
from llava.video import (
    VideoClip,
    VideoLoadError,
    fps_frame_indices,
    load_video,
    uniform_frame_indices,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Synthetic test video: frame i has a flat grey background of level
# BASE + STEP * i (so the decoded frame index can be read back from the pixels)
# and a fixed pure-red square in the top-left corner (to check RGB order).
NUM_FRAMES = 40
VIDEO_FPS = 10
WIDTH, HEIGHT = 64, 48
BASE, STEP = 10, 5


def _synthetic_frame(index: int) -> np.ndarray:
    frame = np.full((HEIGHT, WIDTH, 3), BASE + STEP * index, dtype=np.uint8)
    frame[:16, :16] = (255, 0, 0)
    return frame


def _write_video(path: Path, codec: str, frames: int = NUM_FRAMES) -> Path:
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(VIDEO_FPS, 1))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate = 2_000_000
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_synthetic_frame(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _index_of(frame: np.ndarray) -> int:
    """Read the synthetic frame index back from the grey background."""
    level = frame[HEIGHT // 2 :, WIDTH // 2 :].astype(np.float64).mean()
    return int(round((level - BASE) / STEP))


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    paths = {
        "mp4": _write_video(root / "clip.mp4", codec),
        # Matroska stores no frame count, so PyAV reports stream.frames == 0.
        "mkv": _write_video(root / "clip.mkv", codec),
    }

    zero = root / "zero.avi"
    container = av.open(str(zero), mode="w")
    stream = container.add_stream("mpeg4", rate=VIDEO_FPS)
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    container.start_encoding()
    container.close()
    paths["zero"] = zero

    image = root / "still.png"
    Image.fromarray(_synthetic_frame(3)).save(image)
    paths["image"] = image

    folder = root / "frames"
    folder.mkdir()
    for number in range(1, 13):
        Image.fromarray(_synthetic_frame(number)).save(folder / f"{number}.png")
    (folder / "notes.txt").write_text("not a frame")
    paths["folder"] = folder
    return paths


# ----------------------------------------------------------------- sampling


@pytest.mark.parametrize(("total", "count"), [(100, 16), (64, 64), (1000, 7), (33, 1)])
def test_uniform_indices_equal_numpy_linspace(total: int, count: int) -> None:
    expected = np.linspace(0, total - 1, count, dtype=int).tolist()
    assert uniform_frame_indices(total, count) == expected


def test_uniform_indices_short_video_returns_each_frame_once() -> None:
    assert uniform_frame_indices(5, 16) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("total", "count"), [(0, 8), (-3, 8), (10, 0)])
def test_uniform_indices_reject_non_positive_arguments(total: int, count: int) -> None:
    with pytest.raises(ValueError):
        uniform_frame_indices(total, count)


def test_fps_indices_step_is_rounded_rate_ratio() -> None:
    # 30 / 4 = 7.5 -> step 8; 40 frames give candidates 0, 8, ..., 32.
    assert fps_frame_indices(40, 30.0, 4.0, num_frames=64) == [0, 8, 16, 24, 32]


def test_fps_indices_select_evenly_when_too_many_candidates() -> None:
    # step 8 over 300 frames -> 38 candidates (0..296); picks at
    # round(7.6 * (i + 1) - 1) = 7, 14, 22, 29, 37.
    assert fps_frame_indices(300, 30.0, 4.0, num_frames=5) == [56, 112, 176, 232, 296]


def test_fps_indices_target_above_source_rate_keeps_every_frame() -> None:
    assert fps_frame_indices(6, 30.0, 60.0, num_frames=10) == [0, 1, 2, 3, 4, 5]


# ----------------------------------------------------------------- decoding


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_load_video_returns_uniformly_sampled_rgb_frames(media: dict[str, Path], backend: str) -> None:
    clip = load_video(media["mp4"], max_frames=8, backend=backend)

    expected = np.linspace(0, NUM_FRAMES - 1, 8, dtype=int).tolist()
    assert clip.backend == backend
    assert clip.frames.dtype == np.uint8
    assert clip.frames.shape == (8, HEIGHT, WIDTH, 3)
    assert clip.frame_indices == expected
    assert [_index_of(f) for f in clip.frames] == expected
    assert clip.frames[0, 4:12, 4:12].mean(axis=(0, 1)) == pytest.approx([255, 0, 0], abs=20)
    assert clip.total_frames == NUM_FRAMES
    assert clip.video_fps == pytest.approx(VIDEO_FPS)
    assert clip.duration == pytest.approx(NUM_FRAMES / VIDEO_FPS)
    assert clip.path == str(media["mp4"])


def test_decord_and_pyav_decode_same_indices_and_pixels(media: dict[str, Path]) -> None:
    a = load_video(media["mp4"], max_frames=12, backend="decord")
    b = load_video(media["mp4"], max_frames=12, backend="pyav")

    assert a.frame_indices == b.frame_indices
    assert a.frames.shape == b.frames.shape
    assert np.abs(a.frames.astype(np.int16) - b.frames.astype(np.int16)).mean() < 2.0


def test_load_video_with_fps_samples_at_target_rate(media: dict[str, Path]) -> None:
    # 10 fps source at 2 fps -> step 5 -> 8 candidates, all within max_frames.
    clip = load_video(media["mp4"], max_frames=64, fps=2.0, backend="pyav")

    assert clip.frame_indices == [0, 5, 10, 15, 20, 25, 30, 35]
    assert [_index_of(f) for f in clip.frames] == clip.frame_indices


def test_pyav_counts_frames_by_decoding_when_container_has_no_count(media: dict[str, Path]) -> None:
    with av.open(str(media["mkv"])) as container:
        assert container.streams.video[0].frames == 0

    clip = load_video(media["mkv"], max_frames=4, backend="pyav")

    assert clip.total_frames == NUM_FRAMES
    assert clip.frame_indices == [0, 13, 26, 39]
    assert [_index_of(f) for f in clip.frames] == [0, 13, 26, 39]


def test_pyav_stops_decoding_after_last_wanted_frame(media: dict[str, Path]) -> None:
    found, decoded = video_mod._pyav_decode_indices(str(media["mp4"]), [0, 3])

    assert sorted(found) == [0, 3]
    assert decoded == 4


def test_auto_backend_prefers_decord(media: dict[str, Path]) -> None:
    assert load_video(media["mp4"], max_frames=2).backend == "decord"


def test_auto_backend_falls_back_to_pyav_when_decord_fails(
    media: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import decord

    def broken_reader(*args: object, **kwargs: object) -> None:
        raise decord.DECORDError("simulated decord failure")

    monkeypatch.setattr(decord, "VideoReader", broken_reader)

    clip = load_video(media["mp4"], max_frames=4)

    assert clip.backend == "pyav"
    assert [_index_of(f) for f in clip.frames] == clip.frame_indices


def test_auto_backend_uses_pyav_when_decord_is_not_installed(
    media: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError

    assert load_video(media["mp4"], max_frames=4).backend == "pyav"


def test_decord_backend_returns_numpy_even_with_torch_bridge(media: dict[str, Path]) -> None:
    pytest.importorskip("torch")
    import decord

    with decord.bridge.use_torch():
        clip = load_video(media["mp4"], max_frames=2, backend="decord")

    assert isinstance(clip.frames, np.ndarray)
    assert clip.frames.shape == (2, HEIGHT, WIDTH, 3)


def test_image_file_loads_as_single_frame(media: dict[str, Path]) -> None:
    clip = load_video(media["image"], max_frames=16)

    assert clip.backend == "image"
    assert clip.frames.shape == (1, HEIGHT, WIDTH, 3)
    assert np.array_equal(clip.frames[0], _synthetic_frame(3))
    assert (clip.frame_indices, clip.video_fps, clip.total_frames, clip.duration) == ([0], 1.0, 1, 0.0)


def test_frames_folder_sorted_naturally_and_sampled_uniformly(media: dict[str, Path]) -> None:
    clip = load_video(media["folder"], max_frames=4, fps=2.0)

    # 12 frames named 1.png..12.png; linspace(0, 11, 4) -> positions 0, 3, 7, 11.
    assert clip.backend == "frames-folder"
    assert clip.frame_indices == [0, 3, 7, 11]
    assert [_index_of(f) for f in clip.frames] == [1, 4, 8, 12]
    assert (clip.total_frames, clip.video_fps, clip.duration) == (12, 2.0, 6.0)


def test_frames_folder_defaults_to_one_fps(media: dict[str, Path]) -> None:
    assert load_video(media["folder"], max_frames=2).video_fps == 1.0


# ----------------------------------------------------------------- errors


def _assert_load_error(path: Path, cause: str, **kwargs: object) -> None:
    with pytest.raises(VideoLoadError) as info:
        load_video(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    assert cause in message


def test_missing_file_raises_load_error(tmp_path: Path) -> None:
    _assert_load_error(tmp_path / "nope.mp4", "does not exist")


def test_empty_file_raises_load_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.mp4"
    path.touch()
    _assert_load_error(path, "empty")


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_random_bytes_raise_load_error(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "noise.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    _assert_load_error(path, "decoder error", backend=backend)


def test_truncated_mp4_raises_load_error(media: dict[str, Path], tmp_path: Path) -> None:
    data = media["mp4"].read_bytes()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])
    _assert_load_error(path, "decoder error")


def test_zero_frame_video_raises_load_error(media: dict[str, Path]) -> None:
    _assert_load_error(media["zero"], "0 frames")


def test_directory_without_images_raises_load_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no frames here")
    _assert_load_error(tmp_path, "no image frames")


def test_corrupt_image_raises_load_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"definitely not a jpeg")
    _assert_load_error(path, "cannot decode image")


@pytest.mark.parametrize("max_frames", [0, -1])
def test_non_positive_max_frames_raises_load_error(media: dict[str, Path], max_frames: int) -> None:
    _assert_load_error(media["mp4"], "max_frames", max_frames=max_frames)


def test_unknown_backend_raises_value_error(media: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="backend"):
        load_video(media["mp4"], backend="opencv")


# ----------------------------------------------------------------- real files: GIFs, rotation, VFR, seeking

GIF_RED_LEVELS = [36, 73, 109, 146, 182, 219]  # one per frame; exact in GIF's 'rgb8' palette up to rounding
GIF_DELAYS_CS = [10, 20, 10, 50, 10, 30]  # per-frame delays in 1/100 s


def _write_gif(path: Path, delays_cs: list[int]) -> Path:
    """An animated GIF whose frame i has a flat red level ``GIF_RED_LEVELS[i]`` and lasts ``delays_cs[i]``."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("gif", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "rgb8"
        stream.time_base = Fraction(1, 100)
        start = 0
        for level, delay in zip(GIF_RED_LEVELS, delays_cs):
            rgb = np.zeros((24, 32, 3), dtype=np.uint8)
            rgb[..., 0], rgb[..., 2] = level, 85
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = start, Fraction(1, 100)
            start += delay
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_gif_is_a_video_when_animated_and_an_image_when_single_frame(tmp_path: Path, backend: str) -> None:
    path = _write_gif(tmp_path / "anim.gif", GIF_DELAYS_CS)
    # The frame times the file really carries, read independently with Pillow (milliseconds per frame).
    with Image.open(path) as image:
        delays = []
        for number in range(image.n_frames):
            image.seek(number)
            delays.append(image.info["duration"] / 1000)
    starts = np.concatenate([[0.0], np.cumsum(delays)[:-1]])

    clip = load_video(path, max_frames=3, backend=backend)

    assert clip.backend == "pyav"  # decord cannot read GIFs
    assert clip.total_frames == len(GIF_DELAYS_CS) == len(delays)
    assert clip.frame_indices == [0, 2, 5]
    assert clip.frames.shape == (3, 24, 32, 3)
    assert clip.frames[:, 12, 16, 0].tolist() == pytest.approx([GIF_RED_LEVELS[i] for i in (0, 2, 5)], abs=4)
    assert clip.frame_times == pytest.approx(starts[[0, 2, 5]].tolist())
    assert clip.duration == pytest.approx(sum(delays))

    still = tmp_path / "still.gif"
    Image.new("RGB", (8, 6), (255, 0, 0)).save(still)
    assert load_video(still, max_frames=3, backend=backend).backend == "image"


def _set_mp4_rotation(path: Path, degrees: int) -> None:
    """Write a display matrix that rotates the picture ``degrees`` clockwise into the MP4's track header (what
    phones write; FFmpeg's own muxer no longer takes a 'rotate' tag)."""
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    assert at > 0 and data.count(b"tkhd") == 1
    version = data[at + 4]
    # after 'tkhd': version+flags (4), times, track id, reserved, duration (20 or 32), reserved (8),
    # layer, alternate group, volume, reserved (8), then the 3x3 matrix of 32-bit values
    matrix_at = at + 4 + 4 + (32 if version == 1 else 20) + 8 + 8
    cos, sin = round(np.cos(np.radians(degrees))), round(np.sin(np.radians(degrees)))
    fixed = [cos, sin, 0, -sin, cos, 0, 0, 0, 0]  # a, b, u, c, d, v, x, y (16.16) ... and w (2.30)
    words = [(value << 16) & 0xFFFFFFFF for value in fixed[:8]] + [1 << 30]
    data[matrix_at : matrix_at + 36] = b"".join(word.to_bytes(4, "big") for word in words)
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("rotated")
    paths = {}
    for degrees in (90, 180, 270):
        path = _write_video(root / f"rot{degrees}.mp4", "libx264", frames=12)
        _set_mp4_rotation(path, degrees)
        paths[degrees] = path
    return paths


def _red_corner(frame: np.ndarray) -> tuple[str, str]:
    """Which corner of ``frame`` holds the red square: ('top'|'bottom', 'left'|'right')."""
    rows, cols = np.nonzero((frame[..., 0] > 200) & (frame[..., 1] < 60))
    height, width = frame.shape[:2]
    return ("top" if rows.mean() < height / 2 else "bottom", "left" if cols.mean() < width / 2 else "right")


@pytest.mark.parametrize(
    ("degrees", "corner"), [(90, ("top", "right")), (180, ("bottom", "right")), (270, ("bottom", "left"))]
)
def test_pyav_turns_frames_upright_by_the_display_matrix(
    rotated: dict[int, Path], degrees: int, corner: tuple[str, str]
) -> None:
    with av.open(str(rotated[degrees])) as container:  # the file carries the rotation, as FFmpeg reads it
        assert next(container.decode(video=0)).rotation == {90: -90, 180: -180, 270: 90}[degrees]

    clip = load_video(rotated[degrees], max_frames=4, backend="pyav")

    shape = (HEIGHT, WIDTH) if degrees == 180 else (WIDTH, HEIGHT)
    assert clip.frames.shape == (4, *shape, 3)
    assert all(_red_corner(frame) == corner for frame in clip.frames)
    assert [_index_of(np.rot90(f, degrees // 90)) for f in clip.frames] == clip.frame_indices


def test_pyav_and_decord_give_the_same_upright_frames(rotated: dict[int, Path]) -> None:
    # decord 0.6 turns 180-degree videos but fails on 90/270 (then "auto" falls back to PyAV).
    a = load_video(rotated[180], max_frames=6, backend="decord")
    b = load_video(rotated[180], max_frames=6, backend="pyav")

    assert a.frames.shape == b.frames.shape
    assert np.abs(a.frames.astype(np.int16) - b.frames.astype(np.int16)).mean() < 2.0


VFR_PTS_MS = [0, 100, 150, 400, 450, 500, 1000, 1100, 1133, 1600]


def _write_vfr(path: Path) -> Path:
    """Frames at the uneven times ``VFR_PTS_MS`` (milliseconds); frame i is ``_synthetic_frame(i)``."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for i, ms in enumerate(VFR_PTS_MS):
            frame = av.VideoFrame.from_ndarray(_synthetic_frame(i), format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


@pytest.mark.parametrize("suffix", ["mp4", "mkv"])
def test_vfr_frame_times_and_duration_come_from_presentation_times(tmp_path: Path, suffix: str) -> None:
    path = _write_vfr(tmp_path / f"vfr.{suffix}")
    clips = {backend: load_video(path, max_frames=5, backend=backend) for backend in ("decord", "pyav")}

    for clip in clips.values():
        assert clip.frame_indices == [0, 2, 4, 6, 9]
        assert [_index_of(f) for f in clip.frames] == clip.frame_indices
        assert clip.frame_times == pytest.approx([VFR_PTS_MS[i] / 1000 for i in clip.frame_indices], abs=1e-6)
        # from the first frame's start to the last frame's end (the last frame lasts one frame interval)
        assert 1.6 < clip.duration <= 1.7 + 1e-6
        assert "located at 0.00s,0.15s,0.45s,1.00s,1.60s." in clip.info()
    assert clips["pyav"].duration == pytest.approx(clips["decord"].duration, abs=1e-6)


class _FakePacket:
    def __init__(self, pts: int, dts: int, duration: int, keyframe: bool = False) -> None:
        self.pts, self.dts, self.duration, self.size = pts, dts, duration, 100
        self.is_keyframe, self.is_discard = keyframe, False


class _FakeDemuxer:
    """Stands in for an opened container whose video stream yields ``packets`` (in decode order)."""

    def __init__(self, packets: list[_FakePacket]) -> None:
        self.packets = packets

    def demux(self, stream):
        return iter(self.packets)


# The packets of the VFR MP4 above (time base 1/16000, B-frames: decode order differs from presentation order) as
# two FFmpeg generations report them: none with a duration (PyAV 12-15), or the steps between decode times (16-18).
VFR_MP4_PACKETS = [(0, -2400), (7200, -800), (2400, 0), (1600, 1600), (6400, 2400), (18128, 6400), (16000, 7200),
                   (8000, 8000), (17600, 16000), (25600, 17600)]  # fmt: skip
VFR_MP4_DECODE_STEPS = [1600, 800, 1600, 800, 4000, 800, 800, 8000, 1600, 1600]


@pytest.mark.parametrize("pyav", ["15", "18"])
def test_vfr_mp4_duration_is_the_same_whichever_packet_durations_ffmpeg_reports(pyav: str) -> None:
    durations = [0] * 10 if pyav == "15" else VFR_MP4_DECODE_STEPS
    packets = [_FakePacket(p, d, n, keyframe=i == 0) for i, ((p, d), n) in enumerate(zip(VFR_MP4_PACKETS, durations))]
    stream = type("Stream", (), {"time_base": Fraction(1, 16000)})()
    index = read_packet_index(_FakeDemuxer(packets), stream, frame_rate=20.0)
    assert index.frame_pts == sorted(p for p, _ in VFR_MP4_PACKETS)
    # the last frame is shown at 1.6 s and lasts one interval at the stream's 20 fps, as decord counts it
    assert index.duration == pytest.approx(1.6 + 1 / 20)


def test_presentation_packet_durations_give_the_last_frames_length() -> None:
    # a GIF's packets: each lasts until the next is shown, the last one 0.5 s (time base 1/100)
    starts, delays = [0, 10, 30, 60, 100], [10, 20, 30, 40, 50]
    packets = [_FakePacket(p, p, n, keyframe=i == 0) for i, (p, n) in enumerate(zip(starts, delays))]
    stream = type("Stream", (), {"time_base": Fraction(1, 100)})()
    index = read_packet_index(_FakeDemuxer(packets), stream, frame_rate=10.0)
    assert index.duration == pytest.approx(1.5)


def _write_gop_video(path: Path, frames: int, gop: int, **options: str) -> Path:
    """H.264 with a keyframe every ``gop`` frames and B-frames; the picture changes every frame."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(
            "libx264",
            rate=VIDEO_FPS,
            options={"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "2", **options},
        )
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        rng = np.random.default_rng(0)
        for i in range(frames):
            rgb = np.full((HEIGHT, WIDTH, 3), (7 * i) % 200, dtype=np.uint8)
            rgb[i % (HEIGHT - 8) :][:8, : 8 + i % 40] = (255, 40, 0)
            rgb[-8:, -8:] = rng.integers(0, 256, (8, 8, 3))
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def gop_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gop")
    return {
        "mp4": _write_gop_video(root / "gop.mp4", 90, 7),
        "mkv": _write_gop_video(root / "gop.mkv", 90, 7),
        # MPEG-TS seeks by decode time and lands only near the asked-for keyframe
        "ts": _write_gop_video(root / "gop.ts", 90, 7),
        # an open GOP: the B-frames shown just before a keyframe are decoded after it, from the group before
        "open-gop.mp4": _write_gop_video(root / "open.mp4", 90, 9, **{"x264-params": "open-gop=1"}),
        "long.mp4": _write_gop_video(root / "long.mp4", 300, 10),
    }


def _packet_index(path: Path) -> PacketIndex:
    with av.open(str(path)) as container:
        index = read_packet_index(container, container.streams.video[0], VIDEO_FPS)
    assert index is not None
    return index


def _spy_on_seek_decode(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record what each call of ``_pyav_seek_decode`` returns (``None``: it gave up and load_video decoded in order)."""
    results: list[object] = []
    real = video_mod._pyav_seek_decode

    def spy(*args: object) -> object:
        results.append(real(*args))
        return results[-1]

    monkeypatch.setattr(video_mod, "_pyav_seek_decode", spy)
    return results


@pytest.mark.parametrize("name", ["mp4", "mkv", "ts", "open-gop.mp4"])
@pytest.mark.parametrize(("max_frames", "fps"), [(5, None), (16, None), (64, 3.0)])
def test_pyav_seeking_returns_exactly_the_sequential_frames(
    gop_videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch, name: str, max_frames: int, fps: float | None
) -> None:
    path = gop_videos[name]
    index = _packet_index(path)
    assert len(index.keyframes) >= 9
    assert index.packet_pts != sorted(index.packet_pts)  # B-frames: decode order differs from presentation order
    seek_results = _spy_on_seek_decode(monkeypatch)

    clip = load_video(path, max_frames=max_frames, fps=fps, backend="pyav")
    expected, _ = video_mod._pyav_decode_indices(str(path), clip.frame_indices)

    assert len(seek_results) == 1 and seek_results[0] is not None  # it did seek
    assert clip.total_frames == 90
    assert np.array_equal(clip.frames, np.stack([expected[i].image for i in clip.frame_indices]))
    assert clip.frame_times == [expected[i].time for i in clip.frame_indices]


def test_pyav_seeking_decodes_only_the_groups_the_sampled_frames_need(gop_videos: dict[str, Path]) -> None:
    path = gop_videos["long.mp4"]  # 300 frames, a keyframe every 10
    index = _packet_index(path)
    indices = uniform_frame_indices(300, 4)  # 0, 99, 199, 299

    found, decoded = video_mod._pyav_seek_decode(str(path), index, indices)
    _, decoded_in_order = video_mod._pyav_decode_indices(str(path), indices)

    assert sorted(found) == indices
    assert decoded_in_order == 300
    # each frame needs at most its group of 10 (plus a B-frame or two reordered across the boundary)
    assert decoded <= 4 * 13


def test_pyav_falls_back_to_sequential_decoding_when_a_seek_overshoots(
    gop_videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = gop_videos["mp4"]
    real_seek = video_mod._seek
    monkeypatch.setattr(video_mod, "_seek", lambda container, stream, timestamp: real_seek(container, stream, 10**9))
    seek_results = _spy_on_seek_decode(monkeypatch)

    clip = load_video(path, max_frames=6, backend="pyav")
    expected, _ = video_mod._pyav_decode_indices(str(path), clip.frame_indices)

    assert seek_results == [None]
    assert clip.frame_indices == uniform_frame_indices(90, 6)
    assert np.array_equal(clip.frames, np.stack([expected[i].image for i in clip.frame_indices]))


def test_pyav_counts_frames_without_decoding(media: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(path: str) -> int:
        raise AssertionError("counted frames by decoding the whole file")

    monkeypatch.setattr(video_mod, "_pyav_count_frames", no_decoding)

    clip = load_video(media["mkv"], max_frames=4, backend="pyav")  # Matroska stores no frame count

    assert clip.total_frames == NUM_FRAMES
    assert [_index_of(f) for f in clip.frames] == [0, 13, 26, 39]


# ----------------------------------------------------------------- VideoClip


def _clip(indices: list[int], fps: float = 10.0, total: int = 123) -> VideoClip:
    frames = np.zeros((len(indices), 2, 2, 3), dtype=np.uint8)
    return VideoClip(frames, indices, fps, total, total / fps, "pyav", "x.mp4")


def test_frame_times_are_indices_over_fps() -> None:
    assert _clip([0, 5, 25], fps=10.0).frame_times == pytest.approx([0.0, 0.5, 2.5])


def test_info_reports_duration_and_timestamps() -> None:
    info = _clip([0, 8, 16], fps=10.0, total=123).info()

    assert info == (
        "The video lasts for 12.30 seconds, and 3 frames are uniformly sampled from it. "
        "These frames are located at 0.00s,0.80s,1.60s."
    )


# ----------------------------------------------------------------- demo video


def test_demo_scene_has_one_flash_frame_and_in_domain_answers() -> None:
    from playground.demo_video import DEMO_QUESTIONS, DEMO_SCENE
    from playground.synthetic_data import COLORS, render_scene

    frames = render_scene(DEMO_SCENE)

    assert frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8
    yellow = np.array(COLORS["yellow"])
    assert [bool((f == yellow).all(axis=-1).any()) for f in frames] == [t == 9 for t in range(16)]
    assert DEMO_QUESTIONS["What color was the flash?"] == "yellow"
    assert DEMO_QUESTIONS["Which direction does the red square move?"] == "right"
    assert DEMO_QUESTIONS["How many shapes are there?"] == "two"


def test_demo_asset_is_the_rendered_demo_scene(tmp_path: Path) -> None:
    from playground.demo_video import DEMO_SCENE, write_demo_video
    from playground.synthetic_data import render_scene

    path = REPO_ROOT / "assets" / "demo.mp4"
    assert os.path.getsize(path) < 100 * 1024
    clip = load_video(path, max_frames=64)

    assert clip.frames.shape == (16, 64, 64, 3)
    assert clip.video_fps == pytest.approx(8.0)
    # Lossy coding moves pixel values a little, never the scene.
    error = np.abs(clip.frames.astype(int) - render_scene(DEMO_SCENE).astype(int)).mean()
    assert error < 4.0
    write_demo_video(tmp_path / "again.mp4")
    assert np.array_equal(load_video(tmp_path / "again.mp4", max_frames=64).frames, clip.frames)


def test_fps_sampling_rounds_ties_as_the_reference_does():
    # The reference computes the ratio len(candidates) / num_frames first, then round((i + 1) * ratio - 1);
    # the other order of the float operations rounds some ties the other way (104 candidates for 96 frames).
    for num_frames in (16, 24, 48, 64, 96, 128):
        for count in range(num_frames + 1, 4 * num_frames):
            ratio = count / num_frames
            expected = [round((i + 1) * ratio - 1) * 2 for i in range(num_frames)]
            assert fps_frame_indices(2 * count, 30.0, 15.0, num_frames) == expected, (count, num_frames)
    assert fps_frame_indices(208, 30.0, 15.0, 96)[53] == 2 * 57  # (i + 1) * L / N - 1 would give 2 * 58
