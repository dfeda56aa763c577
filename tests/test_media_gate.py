"""The media gate (``llava.media_gate``) on the shared loader ``llava.video.load_video``: every entry point (CLI,
web demo, server, lmms-eval plugin, training) decodes through it, so these cases hold for all of them.

Hostile files are written by the tests: FFmpeg concat scripts and HLS playlists naming a canary video,
files whose name lies about their content, a 60,000-frame video with a single keyframe, a PNG bomb. The canary
is watched with inotify (C-level opens, FFmpeg's and decord's included) and a Python audit hook.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from media_helpers import OpenWatch, assert_stopped, write_one_keyframe_video, write_png_bomb

from llava import video
from llava.media_gate import MediaLimits, MediaRefused
from llava.video import VideoLoadError, load_video

REPO = Path(__file__).resolve().parents[1]
DEMO_VIDEO = REPO / "assets" / "demo.mp4"
BACKENDS = ["auto", "decord", "pyav"]


@pytest.fixture
def canary(tmp_path) -> Path:
    path = tmp_path / "canary.mp4"
    shutil.copy(DEMO_VIDEO, path)
    return path


@pytest.fixture(scope="module")
def one_keyframe(tmp_path_factory) -> Path:
    return write_one_keyframe_video(tmp_path_factory.mktemp("long") / "one_keyframe.mp4", frames=60_000)


def refused(path: Path, **kwargs) -> MediaRefused:
    with pytest.raises(MediaRefused) as caught:
        load_video(path, **kwargs)
    assert str(path) in str(caught.value)
    return caught.value


# ------------------------------------------------------------------------------------------ files naming files


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_concat_script_named_like_a_video_is_refused_and_its_files_never_opened(tmp_path, canary, backend):
    playlist = tmp_path / "clip.mp4"
    playlist.write_text(f"ffconcat version 1.0\nfile {canary.name}\nfile '{canary}'\n")
    watch = OpenWatch(canary)
    err = refused(playlist, max_frames=4, backend=backend)
    assert err.limit == "containers" and "concat script" in err.cause
    assert watch.opened() == []


def test_an_hls_playlist_is_refused_and_its_segments_never_opened(tmp_path, canary):
    playlist = tmp_path / "stream.m3u8"
    playlist.write_text("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n"
                        f"#EXTINF:2.0,\n{canary.name}\n#EXT-X-ENDLIST\n")
    watch = OpenWatch(canary)
    err = refused(playlist, max_frames=4)
    assert err.limit == "containers" and "HLS playlist" in err.cause
    assert watch.opened() == []


def test_an_image_sequence_pattern_is_never_expanded(tmp_path, canary):
    frames = [tmp_path / f"seq_{i:03d}.mp4" for i in range(1, 3)]
    for frame in frames:
        shutil.copy(canary, frame)
    pattern = tmp_path / "seq_%03d.mp4"
    watch = OpenWatch(*frames)
    with pytest.raises(VideoLoadError, match="does not exist"):
        load_video(pattern, max_frames=2)
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "still.jpg")
    (tmp_path / "still.jpg").rename(pattern)  # the literal name exists now: a JPEG under a video's name
    err = refused(pattern, max_frames=2, backend="pyav")
    assert err.limit == "containers" and "JPEG image" in err.cause
    assert watch.opened() == []


def test_a_file_whose_name_lies_about_its_content_is_refused(tmp_path):
    from PIL import Image

    png_as_video = tmp_path / "clip.mp4"
    Image.new("RGB", (16, 16)).save(png_as_video, format="PNG")
    assert refused(png_as_video).limit == "containers"
    video_as_image = tmp_path / "frame.png"
    shutil.copy(DEMO_VIDEO, video_as_image)
    assert refused(video_as_image).limit == "image_formats"


# ------------------------------------------------------------------------------------------ header bounds


def test_a_codec_outside_the_allow_list_is_refused_before_decoding():
    err = refused(DEMO_VIDEO, limits=MediaLimits(codecs={"vp9"}))
    assert err.limit == "codecs" and "'h264'" in err.cause


def test_frame_size_is_bounded_from_the_header():
    assert refused(DEMO_VIDEO, limits=MediaLimits(max_side=32)).limit == "max_side"
    assert refused(DEMO_VIDEO, limits=MediaLimits(max_pixels=64 * 63)).limit == "max_pixels"


def test_a_png_bomb_is_refused_by_its_pixel_count_without_decoding(tmp_path):
    bomb = write_png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 300_000
    err = refused(bomb)  # the default limits: 8192 x 8192
    assert err.limit == "max_pixels" and "13000x13000" in err.cause


def test_a_long_video_is_refused_by_its_duration_and_frame_count(one_keyframe):
    err = refused(one_keyframe, limits=MediaLimits(max_duration_s=600))
    assert err.limit == "max_duration_s" and "2,000.0 s" in err.cause
    err = refused(one_keyframe, limits=MediaLimits(max_source_frames=10_000))
    assert err.limit == "max_source_frames" and "60,000 frames" in err.cause


# ------------------------------------------------------------------------------------------ decoding work


def test_a_video_with_one_keyframe_is_refused_by_its_decoding_work_before_a_frame_is_decoded(one_keyframe,
                                                                                                monkeypatch):
    decoded = []
    for decoder in ("_load_with_pyav", "_load_with_decord"):
        monkeypatch.setattr(video, decoder, lambda *args: decoded.append(args))
    err = refused(one_keyframe, max_frames=16, limits=MediaLimits(max_decode_frames=20_000))
    assert err.limit == "max_decode_frames" and "decoding 60,000 frames" in err.cause
    assert decoded == []


def test_decoding_work_counts_from_each_keyframe(tmp_path):
    path = write_one_keyframe_video(tmp_path / "gop10.mp4", frames=100, keyframe_every=10)
    # frames 0 and 99: frame 0 alone, then from the keyframe at 90 to 99
    load_video(path, max_frames=2, limits=MediaLimits(max_decode_frames=11))
    err = refused(path, max_frames=2, limits=MediaLimits(max_decode_frames=10))
    assert "decoding 11 frames" in err.cause


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_decode_over_its_time_limit_is_stopped(one_keyframe, backend):
    err = refused(one_keyframe, max_frames=16, backend=backend, limits=MediaLimits(max_decode_seconds=0.05))
    assert err.limit == "max_decode_seconds" and "was stopped" in err.cause
    assert_stopped()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_decode_within_its_time_limit_gives_the_in_process_frames(backend):
    inside = load_video(DEMO_VIDEO, max_frames=5, backend=backend)
    child = load_video(DEMO_VIDEO, max_frames=5, backend=backend, limits=MediaLimits(max_decode_seconds=60))
    assert np.array_equal(child.frames, inside.frames)
    assert (child.frame_indices, child.frame_times, child.backend) == (
        inside.frame_indices, inside.frame_times, inside.backend)


def _write_video(path: Path, container: str, codec: str, frames: int) -> Path:
    import av

    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((32, 32, 3), 2 * i, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    return path


def test_a_video_that_also_begins_like_a_playlist_is_refused(tmp_path):
    # FFmpeg probes it as MPEG-TS among the allowed demuxers; without a whitelist (decord) it is an HLS playlist
    video = _write_video(tmp_path / "v.ts", "mpegts", "mpeg2video", 20)
    polyglot = tmp_path / "clip.ts"
    polyglot.write_bytes(b"#EXTM3U\n" + video.read_bytes())
    assert len(load_video(video, max_frames=4, backend="pyav").frames) == 4
    err = refused(polyglot, max_frames=4, backend="pyav")
    assert err.limit == "containers" and "HLS playlist" in err.cause


def test_decoding_work_without_a_packet_index_is_bounded_by_the_duration(tmp_path, monkeypatch):
    from llava import media_gate

    mkv = _write_video(tmp_path / "v.mkv", "matroska", "mpeg4", 100)  # Matroska gives no frame count
    monkeypatch.setattr(media_gate, "read_packet_index", lambda *args: None)  # packets that cannot be indexed
    err = refused(mkv, max_frames=4, backend="pyav", limits=MediaLimits(max_decode_frames=5))
    assert err.limit == "max_decode_frames"


def test_a_packet_index_that_fails_leaves_the_decoder_its_fallback(tmp_path, monkeypatch):
    import av

    from llava import media_gate

    def damaged(*args):
        raise av.InvalidDataError(1094995529, "Invalid data found when processing input")

    mkv = _write_video(tmp_path / "v.mkv", "matroska", "mpeg4", 100)
    monkeypatch.setattr(media_gate, "read_packet_index", damaged)
    clip = load_video(mkv, max_frames=4, backend="pyav", limits=MediaLimits(max_decode_frames=500))
    assert len(clip.frames) == 4


def _decode_in_forked_child(path: str) -> dict:
    from llava import media_gate

    idle_at_start = len(media_gate._WORKERS.idle)
    clip = load_video(path, max_frames=5, limits=MediaLimits(max_decode_seconds=60))
    return {"idle_at_start": idle_at_start, "frames": len(clip.frames),
            "workers": [w.process.pid for w in media_gate._WORKERS.idle]}


def test_a_forked_process_decodes_with_workers_of_its_own():
    import multiprocessing

    from llava import media_gate

    limits = MediaLimits(max_decode_seconds=60)
    load_video(DEMO_VIDEO, max_frames=5, limits=limits)  # leaves an idle worker to this process
    parents = {w.process.pid for w in media_gate._WORKERS.idle}
    assert parents
    with multiprocessing.get_context("fork").Pool(1) as pool:  # as a DataLoader worker is forked
        child = pool.apply(_decode_in_forked_child, (str(DEMO_VIDEO),))
    assert child["idle_at_start"] == 0 and child["frames"] == 5
    assert child["workers"] and not parents & set(child["workers"])
    assert len(load_video(DEMO_VIDEO, max_frames=5, limits=limits).frames) == 5  # the parent's worker still answers


def test_a_refusal_inside_the_child_process_comes_back_as_a_refusal(one_keyframe):
    limits = MediaLimits(max_decode_seconds=60, max_decode_frames=100)
    assert refused(one_keyframe, max_frames=4, limits=limits).limit == "max_decode_frames"


# ------------------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(("field", "value"), [
    ("max_pixels", 0), ("max_side", -1), ("max_duration_s", float("nan")), ("max_decode_seconds", 0),
    ("max_source_frames", 1.5), ("containers", ()),
])
def test_limits_are_validated_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"MediaLimits.{field}"):
        MediaLimits(**{field: value})


def test_frames_folder_frames_pass_the_image_checks(tmp_path):
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30)).save(folder / f"{i}.png")
    assert load_video(folder, max_frames=3).frames.shape == (3, 30, 40, 3)
    assert refused(folder, limits=MediaLimits(max_pixels=1000)).limit == "max_pixels"
    assert refused(folder, limits=MediaLimits(max_source_frames=2)).limit == "max_source_frames"
