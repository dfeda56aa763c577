"""What a video container says before any frame is decoded, shared by the media gate (:mod:`llava.media_gate`,
which bounds the work from it) and the decoders (:mod:`llava.video`, which seek with it): the error every media
reader raises, a frame rate worth trusting, and the packet index (where each frame lies and which keyframe to
start decoding from), read by demuxing only.
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

__all__ = ["PacketIndex", "VideoLoadError", "read_packet_index", "valid_fps"]


class VideoLoadError(ValueError):
    """The input could not be read as a video; the message names the path and the cause."""

    def __init__(self, path: str | os.PathLike[str], cause: str) -> None:
        self.path = os.fspath(path)
        self.cause = cause
        super().__init__(f"cannot read video '{self.path}': {cause}")


def valid_fps(value: Any) -> float | None:
    """``value`` as frames per second when it is a finite positive number, else ``None``."""
    try:
        rate = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return rate if math.isfinite(rate) and rate > 0 else None


@dataclass
class PacketIndex:
    """Where each frame of a video stream lies, read from its packets without decoding them.

    Packets are numbered by *position*, their order in the file (decode order); frames by their order of
    presentation, which is the order sequential decoding outputs them, so frame ``i`` here is the ``i``-th frame
    that decoding from the start yields. Timestamps are in the stream's ``time_base``.
    """

    packet_pts: list[int]  # by position
    packet_dts: list[int | None]  # by position
    keyframes: list[int]  # positions of keyframe packets, ascending; always starts with 0
    frame_pts: list[int]  # by frame, ascending
    frame_position: list[int]  # by frame: the position of its packet
    time_base: Fraction
    duration: float  # seconds from frame 0's start to the end of the last frame

    def start_keyframe(self, frame: int) -> int:
        """Position of the keyframe to start decoding from to get ``frame`` exactly as sequential decoding does.

        That is the last keyframe before the frame's packet whose own presentation time is not after the frame
        (in an open GOP, the frames shown just before a keyframe are decoded after it but refer to the previous
        group, so they need the keyframe before); position 0 when there is none.
        """
        position = self.frame_position[frame]
        k = bisect.bisect_right(self.keyframes, position) - 1
        while k > 0 and self.packet_pts[self.keyframes[k]] > self.frame_pts[frame]:
            k -= 1
        return self.keyframes[max(k, 0)]


def read_packet_index(container: Any, stream: Any, frame_rate: float | None) -> PacketIndex | None:
    """Read every packet of ``stream`` (demuxing only, no decoding) into a :class:`PacketIndex`.

    ``None`` when the packets cannot be trusted to stand for the decoded frames one to one: a packet without a
    presentation time, two packets with the same one, or a first packet that is not a keyframe (the decoder
    may then drop frames at the start). Packets the container marks for discarding (cut by an edit list) are
    decoded for their references but output no frame, so they are packets here but not frames.

    ``frame_rate`` (frames per second) gives the last frame a length when its packet has none.
    """
    pts: list[int] = []
    dts: list[int | None] = []
    keyframes: list[int] = []
    frames: list[tuple[int, int]] = []  # (pts, position)
    lengths: dict[int, int] = {}  # pts -> packet duration
    for packet in container.demux(stream):
        if packet.size == 0 and packet.pts is None and packet.dts is None:
            continue  # the empty packet PyAV yields at the end to drain the decoder
        if packet.pts is None or packet.size == 0:
            return None
        position = len(pts)
        pts.append(int(packet.pts))
        dts.append(None if packet.dts is None else int(packet.dts))
        if packet.is_keyframe:
            keyframes.append(position)
        if not packet.is_discard:
            frames.append((int(packet.pts), position))
            lengths[int(packet.pts)] = int(packet.duration or 0)
    if len(set(pts)) != len(pts):
        return None
    if pts and (not keyframes or keyframes[0] != 0):
        return None
    frames.sort()
    time_base = Fraction(stream.time_base) if stream.time_base else None
    if time_base is None or time_base <= 0:
        return None
    duration = 0.0
    if frames:
        frame_pts = [p for p, _ in frames]
        duration = float((frame_pts[-1] - frame_pts[0]) * time_base)
        duration += _last_frame_seconds(frame_pts, lengths, time_base, frame_rate)
    return PacketIndex(
        packet_pts=pts,
        packet_dts=dts,
        keyframes=keyframes,
        frame_pts=[p for p, _ in frames],
        frame_position=[position for _, position in frames],
        time_base=time_base,
        duration=duration,
    )


def _last_frame_seconds(
    frame_pts: list[int], lengths: dict[int, int], time_base: Fraction, rate: float | None
) -> float:
    """How long the last frame (``frame_pts`` ascending, ``lengths`` packet durations by pts) is shown, in seconds:
    its packet's duration where every other frame's equals the gap to the next (GIF delays), else one interval at
    ``rate``, as decord counts. FFmpeg 8 (PyAV 16-18) gives MP4 packets decode-time steps as durations, FFmpeg 6-7
    (PyAV 14-15) none: trusting them gave a VFR MP4 1.70 s on PyAV 18, 1.65 s on PyAV 15 and decord."""
    durations = [lengths[pts] for pts in frame_pts]
    if durations[-1] > 0 and durations[:-1] == [b - a for a, b in zip(frame_pts, frame_pts[1:])]:
        return float(durations[-1] * time_base)
    return 1.0 / rate if rate else 0.0
