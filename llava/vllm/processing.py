"""vLLM's multimodal processing for Slow-Fast checkpoints: frames to pixels, the encoder prompt (one position per slow
token) and the decoder prompt (the text with one placeholder per fast token).

A request carries at most one visual item, a video or an image (vLLM's encoder-decoder path schedules one
encoder input per request). Images are folded into the video modality as one-frame videos, padded to a square with
the processor's mean colour first when the config says ``image_aspect_ratio: pad`` (as ``llava.mm_utils.
process_images`` does); a one-frame sample is then treated as an image by the model (no video pooling). Several
images in one request are read as the frames of one video, in order, with their ``<image>`` placeholders merged
into one: that is how lmms-eval's vLLM backend sends a video (one ``image_url`` per sampled frame).

The prompt text marks the visual item with ``<image>`` (the chat template's placeholder). vLLM hands the processor
the prompt already tokenized; the processor decodes it and tokenizes the text around ``<image>`` piece by piece, as
``llava.mm_utils.tokenizer_image_token`` does for the transformers model, so both see the same ids.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cached_property

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, CLIPImageProcessorPil
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import (
    ImageProcessorItems,
    MultiModalDataItems,
    VideoProcessorItems,
)
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseProcessingInfo,
    EncDecMultiModalProcessor,
    PromptReplacement,
    PromptUpdate,
)

from ..constants import DEFAULT_IMAGE_TOKEN
from ..mm_utils import expand2square, tokenizer_image_token
from .config import SlowFastVllmConfig
from .convnext import TowerShape
from .model_parts.slow_fast import SlowFastParams, count_visual_tokens

ENCODER_TOKEN_ID = 0  # the encoder prompt only counts slow tokens; its ids are never embedded
PIXELS_KEY = "pixel_values_videos"
FRAMES_KEY = "video_num_frames"


def fast_token_id(config, tokenizer) -> int:
    """The decoder-prompt id that marks a fast-token position.

    The first id the tokenizer cannot produce when the model's vocabulary is larger (released Qwen2 checkpoints have
    hundreds of unused ids), else the tokenizer's pad token (tiny checkpoints use every id). A prompt whose text
    holds that id is refused by the processor, so the model finds fast tokens by their id.
    """
    size = len(tokenizer)
    if config.vocab_size > size:
        return size
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "pad_token_id", None)
    if pad is None or not 0 <= int(pad) < config.vocab_size:
        raise ValueError(
            "cannot choose a fast-token placeholder id: the tokenizer uses the whole vocabulary "
            f"(vocab_size={config.vocab_size}) and has no pad token"
        )
    return int(pad)


class SlowFastProcessingInfo(BaseProcessingInfo):
    """What the processor needs from the checkpoint: config, tokenizer, pixel preprocessing and token counts."""

    def get_hf_config(self) -> SlowFastVllmConfig:
        config = self.ctx.get_hf_config()
        if not getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"{type(config).__name__} is not the plugin's config: load the checkpoint with the slowfast-llava vLLM "
                "plugin installed (pip install 'slowfast-llava[vllm]'), which registers model_type "
                "'llava_qwen_slow_fast'"
            )
        return config

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": self.max_frames, "video": 1}

    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        return {"text_kwargs": set(), "images_kwargs": set(), "videos_kwargs": set()}

    def get_hf_processor(self, **kwargs: object):
        raise NotImplementedError("the Slow-Fast processor preprocesses pixels itself (see _call_hf_processor)")

    @cached_property
    def tower_shape(self) -> TowerShape:
        return TowerShape.from_config(self.get_hf_config())

    @cached_property
    def slow_fast_params(self) -> SlowFastParams:
        return SlowFastParams.from_config(self.get_hf_config())

    @cached_property
    def image_processor(self) -> CLIPImageProcessorPil:
        """The project's CLIP-style preprocessing: short side to the tower's size (bicubic), centre crop, CLIP
        mean/std (``llava.model.vision_tower.build_image_processor``)."""
        size = self.tower_shape.image_size
        return CLIPImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            image_mean=list(OPENAI_CLIP_MEAN),
            image_std=list(OPENAI_CLIP_STD),
            do_convert_rgb=True,
        )

    @property
    def max_frames(self) -> int:
        """Most frames one video may have: ``hf_overrides={"vllm_max_frames": N}``, else the trained count."""
        config = self.get_hf_config()
        override = getattr(config, "vllm_max_frames", None)
        if override is not None:
            if not isinstance(override, int) or isinstance(override, bool) or override < 1:
                raise ValueError(f"vllm_max_frames={override!r}: must be a positive integer")
            return override
        return config.video_frames_per_item

    @cached_property
    def fast_token_id(self) -> int:
        return fast_token_id(self.get_hf_config(), self.get_tokenizer())

    def token_counts(self, num_frames: int) -> tuple[int, int]:
        """``(fast, slow)`` tokens of a ``num_frames``-frame item."""
        return count_visual_tokens(num_frames, self.tower_shape.grid_size, self.slow_fast_params)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        # Images travel as one-frame videos, so "video" is the only modality with encoder tokens.
        return {"video": max(self.token_counts(self.max_frames)[1], self.token_counts(1)[1])}

    def parse_mm_data(self, mm_data, *, validate: bool = True) -> MultiModalDataItems:
        """Parse as vLLM does, then fold images into videos (``uint8`` arrays ``[T, H, W, 3]``)."""
        items = super().parse_mm_data(mm_data, validate=validate)
        counts = {k: len(v) for k, v in items.items() if len(v)}
        if not counts:
            return items
        if len(counts) > 1 or counts.get("video", 1) > 1:
            raise ValueError(
                "a Slow-Fast request takes one video, one image, or the frames of one video as images; this one has "
                + ", ".join(f"{n} {k}" for k, n in counts.items())
            )
        (modality, entries), = ((k, items[k]) for k in counts)
        placeholders = 1
        if modality == "image":
            if not isinstance(entries, ImageProcessorItems):
                raise ValueError("image embeddings are not supported: send the image itself")
            if len(entries) == 1:
                frames = self._image_as_frames(entries.get(0))
            else:  # the frames of one video, as lmms-eval's vLLM backend sends them
                frames = self._video_frames([entries.get(i) for i in range(len(entries))])
                placeholders = len(entries)
        elif modality == "video":
            if not isinstance(entries, VideoProcessorItems):
                raise ValueError("video embeddings are not supported: send the frames or a video_url")
            frames = self._video_frames(entries.get(0))
        else:
            raise ValueError(f"modality {modality!r} is not supported: send a video or an image")
        folded = MultiModalDataItems()
        folded["video"] = VideoProcessorItems([frames], metadata=[{"placeholders": placeholders}])
        if modality == "image" and isinstance(mm_data, dict):
            # vLLM next checks the request's data and ids modality by modality against these items: the request now
            # holds one video (the folded frames), and the chat path's ids for the images are left without data,
            # which vLLM accepts. The dict is the request's own (vLLM builds it for chat requests).
            mm_data.pop("image", None)
            mm_data["video"] = frames
        return folded

    def _image_as_frames(self, image) -> np.ndarray:
        if isinstance(image, torch.Tensor):
            image = image.cpu().numpy()
        if isinstance(image, np.ndarray):
            array = image if image.ndim == 3 and image.shape[-1] in (1, 3, 4) else np.moveaxis(image, 0, -1)
            image = Image.fromarray(np.ascontiguousarray(array).astype(np.uint8))
        image = image.convert("RGB")
        if self.get_hf_config().image_aspect_ratio == "pad":
            image = expand2square(image, tuple(int(x * 255) for x in self.image_processor.image_mean))
        return np.asarray(image)[None]

    def _video_frames(self, video) -> np.ndarray:
        if isinstance(video, tuple):  # (frames, metadata) from a video loader
            video = video[0]
        if isinstance(video, torch.Tensor):
            video = video.cpu().numpy()
        if isinstance(video, (list, tuple)):
            frames = [np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame) for frame in video]
            if len({frame.shape for frame in frames}) > 1:
                raise ValueError(
                    f"the frames of one video must share a size; got {sorted({frame.shape for frame in frames})}"
                )
            video = np.stack(frames)
        video = np.asarray(video)
        if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 1:
            raise ValueError(f"a video must be RGB frames [frames, height, width, 3]; got shape {tuple(video.shape)}")
        if video.shape[0] > self.max_frames:
            raise ValueError(
                f"the video has {video.shape[0]} frames, over this model's {self.max_frames} per video: sample "
                "fewer (media_io_kwargs video num_frames), or raise the limit with "
                "hf_overrides={'vllm_max_frames': N}"
            )
        if video.dtype != np.uint8:
            video = np.clip(video, 0, 255).astype(np.uint8)
        return video

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """``uint8`` frames ``[T, H, W, 3]`` -> normalised pixels ``[T, 3, S, S]`` (float32)."""
        return self.image_processor.preprocess(frames, return_tensors="pt")["pixel_values"]


class SlowFastDummyInputsBuilder(BaseDummyInputsBuilder[SlowFastProcessingInfo]):
    """Profiling inputs: a video of the most frames allowed, at the tower's size."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return (DEFAULT_IMAGE_TOKEN + "\n") * min(1, sum(mm_counts.values()))

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        if not sum(mm_counts.values()):
            return {}
        size = self.info.tower_shape.image_size
        overrides = (mm_options or {}).get("video") if mm_options else None
        videos = self._get_dummy_videos(
            width=size, height=size, num_frames=self.info.max_frames, num_videos=1, overrides=overrides
        )
        return {"video": videos}


class SlowFastMultiModalProcessor(EncDecMultiModalProcessor[SlowFastProcessingInfo]):
    """Encoder prompt: one position per slow token. Decoder prompt: the text, ``<image>`` replaced by one
    :func:`fast_token_id` per fast token (no decoder start token is added)."""

    skip_decoder_start_token = True

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        videos = hf_data.get("videos") or []
        pixels = [self.info.preprocess(frames) for frames in videos]
        return BatchFeature(
            {
                PIXELS_KEY: torch.cat(pixels) if pixels else torch.empty(0),
                FRAMES_KEY: torch.tensor([p.shape[0] for p in pixels], dtype=torch.long),
            }
        )

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        frames = hf_inputs.get(FRAMES_KEY, torch.empty(0, dtype=torch.long))
        return {
            PIXELS_KEY: MultiModalFieldConfig.flat_from_sizes("video", frames),
            FRAMES_KEY: MultiModalFieldConfig.batched("video"),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        def slow_positions(item_idx: int) -> list[int]:
            frames = int(out_mm_kwargs["video"][item_idx][FRAMES_KEY].data)
            return [ENCODER_TOKEN_ID] * self.info.token_counts(frames)[1]

        return [PromptReplacement(modality="video", target=[ENCODER_TOKEN_ID], replacement=slow_positions)]

    def create_encoder_prompt(self, prompt: list[int], mm_items: MultiModalDataItems) -> list[int]:
        return [ENCODER_TOKEN_ID] * len(mm_items.get("video", []))

    def create_decoder_prompt(self, prompt: str | list[int], mm_items: MultiModalDataItems) -> list[int]:
        tokenizer = self.info.get_tokenizer()
        text = prompt if isinstance(prompt, str) else self._detokenize(prompt)
        videos = mm_items.get("video", [])
        expected = sum(self._placeholders(videos, i) for i in range(len(videos)))
        found = text.count(DEFAULT_IMAGE_TOKEN)
        if found != expected:
            raise ValueError(
                f"the prompt has {found} {DEFAULT_IMAGE_TOKEN} placeholder(s) but {expected} were expected (one per "
                f"video or image, one per frame sent as images): put {DEFAULT_IMAGE_TOKEN} where the visual input goes "
                "(the chat template does this)"
            )
        if expected > len(videos):  # frames sent as images: one placeholder for the video they make
            token = re.escape(DEFAULT_IMAGE_TOKEN)
            text, merged = re.subn(f"{token}(?:\\s*{token}){{{expected - 1}}}", DEFAULT_IMAGE_TOKEN, text, count=1)
            if not merged:
                raise ValueError(f"the {expected} {DEFAULT_IMAGE_TOKEN} placeholders of one video's frames must be adjacent")
        marker = -1
        ids = tokenizer_image_token(text, tokenizer, image_token_index=marker)
        sentinel = self.info.fast_token_id
        if sentinel in ids:
            raise ValueError(
                f"the prompt's text holds token id {sentinel} ({tokenizer.decode([sentinel])!r}), which this model "
                "reserves for video positions: remove it from the text"
            )
        counts = iter(self.info.token_counts(videos.get_num_frames(i))[0] for i in range(len(videos)))
        out: list[int] = []
        for token in ids:
            out.extend([sentinel] * next(counts) if token == marker else [token])
        return out

    @staticmethod
    def _placeholders(videos: VideoProcessorItems, index: int) -> int:
        metadata = videos.metadata[index] if isinstance(videos.metadata, list) else None
        return int((metadata or {}).get("placeholders", 1))

    def _detokenize(self, ids: list[int]) -> str:
        tokenizer = self.info.get_tokenizer()
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None and ids[:1] == [bos]:
            ids = ids[1:]  # tokenizer_image_token puts it back where the tokenizer always adds one
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


__all__ = [
    "SlowFastDummyInputsBuilder",
    "SlowFastMultiModalProcessor",
    "SlowFastProcessingInfo",
    "fast_token_id",
]
