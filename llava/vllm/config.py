"""The Slow-Fast configuration as vLLM reads it: the project's own class (same fields, same validation), marked
as an encoder-decoder model.

vLLM serves the vision tower and projector as the encoder (its outputs hold the slow tokens, which the hybrid layers
read through cross-attention) and the language model as the decoder. vLLM decides this from ``is_encoder_decoder``
on the Hugging Face config, which the checkpoints do not set, so this subclass sets it: checkpoints load unchanged.
"""

from __future__ import annotations

from .model_parts.configuration_llava_qwen_slow_fast import LlavaQwenSlowFastConfig

DEFAULT_VIDEO_FRAMES = 64  # frames per video when the config records no trained count (as the project's CLI)


class SlowFastVllmConfig(LlavaQwenSlowFastConfig):
    """[`LlavaQwenSlowFastConfig`] with ``is_encoder_decoder = True``.

    ``decoder_start_token_id`` is set (to the BOS, else the EOS, else the pad token) only because vLLM looks one up
    for every encoder-decoder request; the plugin's processor writes the whole decoder prompt itself, so vLLM never
    inserts that token.
    """

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        self.is_encoder_decoder = True
        if getattr(self, "decoder_start_token_id", None) is None:
            for candidate in (self.bos_token_id, self.eos_token_id, self.pad_token_id, 0):
                if isinstance(candidate, list):
                    candidate = candidate[0] if candidate else None
                if candidate is not None:
                    self.decoder_start_token_id = int(candidate)
                    break

    @property
    def video_frames_per_item(self) -> int:
        """Frames per video: the trained count (``video_frames``, else ``mm_training_video_frames``), else 64."""
        return self.trained_video_frames or DEFAULT_VIDEO_FRAMES


__all__ = ["DEFAULT_VIDEO_FRAMES", "SlowFastVllmConfig"]
