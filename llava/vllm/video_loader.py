"""The ``slowfast`` video loader for vLLM's media connector: decodes a ``video_url`` (or an uploaded video) with the
project's ``llava.video.load_video``, so that the server sees the frames the project's CLI and server see (same
decoder, same uniform sampling ``numpy.linspace(0, n - 1, num_frames, dtype=int)``, same RGB conversion).

The plugin makes it the default for Slow-Fast checkpoints, with ``num_frames`` the checkpoint's trained frame count
(see ``llava.vllm.register``); ``--media-io-kwargs '{"video": {"num_frames": N}}'`` overrides the count.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from ..media_gate import UPLOAD_LIMITS
from ..video import load_video

BACKEND_NAME = "slowfast"


class SlowFastVideoLoader:
    """``load_bytes(data, num_frames)`` -> ``(frames uint8 [T, H, W, 3], metadata)`` in vLLM's loader protocol."""

    @classmethod
    def load_bytes(cls, data: bytes, num_frames: int = -1, fps: float = -1, **kwargs: Any) -> tuple[np.ndarray, dict]:
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(
                f"num_frames={num_frames!r}: the slowfast video loader samples a fixed count of frames, give a "
                "positive one (media_io_kwargs video num_frames)"
            )
        handle, path = tempfile.mkstemp(prefix="slowfast-vllm-", suffix=".video")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            # the bytes came from a request (a data: or web URL): bounded as the project's server bounds uploads
            clip = load_video(path, num_frames, fps=fps if fps and fps > 0 else None, limits=UPLOAD_LIMITS)
        finally:
            os.unlink(path)
        metadata = {
            "total_num_frames": clip.total_frames,
            "fps": clip.video_fps,
            "duration": clip.duration,
            "video_backend": BACKEND_NAME,
            "frames_indices": list(clip.frame_indices),
            "do_sample_frames": False,
        }
        return clip.frames, metadata


def register_video_loader() -> None:
    """Add the loader to vLLM's registry under ``slowfast`` (idempotent)."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY, VideoLoader

    if BACKEND_NAME in VIDEO_LOADER_REGISTRY.name2class:
        return
    loader = type("SlowFastVideoLoaderBackend", (SlowFastVideoLoader, VideoLoader), {})
    VIDEO_LOADER_REGISTRY.register(BACKEND_NAME)(loader)
