"""Helpers shared by training, evaluation and serving: prompt tokenisation, image preprocessing,
model-name parsing, the checkpoint's trained frame count and generation stopping criteria."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import StoppingCriteria

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def _leading_bos(tokenizer: Any) -> list[int]:
    """``[bos_id]`` if the tokenizer prepends a BOS token to every encoding, else ``[]`` (Qwen2)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return []
    probe = tokenizer("a").input_ids
    return [bos_id] if probe[:1] == [bos_id] else []


def tokenizer_image_token(
    prompt: str,
    tokenizer: Any,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    return_tensors: str | None = None,
) -> list[int] | torch.Tensor:
    """Tokenise ``prompt`` with every ``<image>`` replaced by the single id ``image_token_index``.

    The text between image markers is tokenised piece by piece without special tokens, so the marker
    never merges with its neighbours. A BOS token is prepended once if the tokenizer always adds one.

    Returns a list of ids, or a 1-D ``torch.long`` tensor when ``return_tensors="pt"``.
    """
    if return_tensors not in (None, "pt"):
        raise ValueError(f"Unsupported return_tensors: {return_tensors!r} (use None or 'pt')")

    input_ids = _leading_bos(tokenizer)
    for i, piece in enumerate(prompt.split(DEFAULT_IMAGE_TOKEN)):
        if i > 0:
            input_ids.append(image_token_index)
        if piece:
            input_ids.extend(tokenizer(piece, add_special_tokens=False).input_ids)

    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    return input_ids


def get_model_name_from_path(model_path: str) -> str:
    """Model name used to pick templates and loaders: the last path component, or
    ``"<parent>_<checkpoint-N>"`` for intermediate training checkpoints."""
    parts = model_path.rstrip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def expand2square(pil_img: Image.Image, background_color: Any) -> Image.Image:
    """Pad ``pil_img`` to a square of side ``max(width, height)`` filled with ``background_color``,
    keeping the image centred."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), background_color)
    result.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return result


def process_images(
    images: Sequence[Image.Image], image_processor: Any, model_cfg: Any
) -> torch.Tensor | list[torch.Tensor]:
    """Preprocess PIL images into pixel tensors.

    With ``model_cfg.image_aspect_ratio == "pad"`` each image is first padded to a square with the
    processor's mean colour (which normalises to zero). Returns a stacked ``[N, 3, H, W]`` tensor when
    all images end up the same shape, otherwise the list of per-image tensors.
    """
    aspect_ratio = getattr(model_cfg, "image_aspect_ratio", None)
    fill = None
    if aspect_ratio == "pad":
        fill = tuple(int(x * 255) for x in image_processor.image_mean)

    new_images = []
    for image in images:
        if fill is not None:
            image = expand2square(image, fill)
        new_images.append(image_processor.preprocess(image, return_tensors="pt")["pixel_values"][0])

    if new_images and all(x.shape == new_images[0].shape for x in new_images):
        return torch.stack(new_images, dim=0)
    return new_images


def clip_pixels(clip: Any, image_processor: Any, model_cfg: Any) -> torch.Tensor:
    """Pixels ``[T, 3, S, S]`` of a :class:`llava.video.VideoClip` as the model was trained to read them.

    A still image (``clip.backend == "image"``) goes through :func:`process_images`: padded to a square first
    when the config says ``image_aspect_ratio: pad``, as in training; video frames are resized and cropped.
    """
    if getattr(clip, "backend", None) == "image":
        images = [Image.fromarray(frame) for frame in clip.frames]
        pixels = process_images(images, image_processor, model_cfg)
        return pixels if isinstance(pixels, torch.Tensor) else torch.stack(pixels)
    return image_processor.preprocess(clip.frames, return_tensors="pt")["pixel_values"]


# --------------------------------------------------------------------------------------------
# Frames per video
# --------------------------------------------------------------------------------------------

# Config fields that record the training frame count: ours first, then the name the reference's trainer
# writes into the released checkpoints' configs.
TRAINED_FRAMES_FIELDS = ("video_frames", "mm_training_video_frames")


def trained_video_frames(config: Any) -> int | None:
    """Frames per video the checkpoint was trained with, read from its config (``video_frames``, else
    ``mm_training_video_frames``); None when the config records neither."""
    for name in TRAINED_FRAMES_FIELDS:
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


def fast_frame_count(num_frames: int, config: Any) -> tuple[int, bool]:
    """``(fast frames, pooled adaptively)`` for a video of ``num_frames`` frames under ``config``'s
    slow/fast settings: mean-pooled groups of ``fast_token_temporal_stride`` frames when that leaves at
    least ``min_fast_frames``, else adaptive pooling to ``min(frames, min_fast_frames)``."""
    from llava.model.slow_fast import temporal_sample_indices

    stride = getattr(config, "fast_token_temporal_stride", 1)
    min_fast = getattr(config, "min_fast_frames", 1)
    sampling_stride = getattr(config, "fast_token_temporal_sampling_stride", 1)
    sampled = len(temporal_sample_indices(num_frames, sampling_stride, min_fast))
    if num_frames <= 1 or sampled // stride >= min_fast:
        return (num_frames if num_frames <= 1 else sampled // stride), False
    return min(sampled, min_fast), True


def frame_count_warning(requested: int, config: Any) -> str | None:
    """The warning to give when ``requested`` frames per video differ from the checkpoint's trained count.

    None when they agree or the config records no count. The text names both counts and, when the fast path
    changes kind (mean pooling in training, adaptive pooling now, or the reverse), says so.
    """
    trained = trained_video_frames(config)
    if trained is None or requested == trained:
        return None
    message = (
        f"this checkpoint was trained with {trained} frames per video but {requested} are sampled "
        f"(at most); answers may be worse than with {trained}"
    )
    fast_now, adaptive_now = fast_frame_count(requested, config)
    fast_trained, adaptive_trained = fast_frame_count(trained, config)
    if adaptive_now and not adaptive_trained:
        stride = getattr(config, "fast_token_temporal_stride", 1)
        min_fast = getattr(config, "min_fast_frames", 1)
        message += (
            f": {requested} frames / fast_token_temporal_stride {stride} = {requested // stride} < min_fast_frames "
            f"{min_fast}, so the fast tokens are pooled adaptively to {fast_now} frames, which training never did "
            f"({fast_trained} mean-pooled fast frames)"
        )
    return message


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def template_stop(conv_mode: str, tokenizer: Any) -> tuple[str | None, int | None]:
    """The end-of-turn string of template ``conv_mode`` (``<|im_end|>`` for ``qwen_1_5``), and its id when
    the tokenizer holds it as a single token (``None`` otherwise: stop on the text instead)."""
    from llava.conversation import SeparatorStyle, conv_templates

    template = conv_templates[conv_mode]
    stop = template.sep2 if template.sep_style in (SeparatorStyle.TWO, SeparatorStyle.LLAMA_2) else template.sep
    if not stop:
        return None, None
    ids = tokenizer(stop, add_special_tokens=False).input_ids
    return stop, ids[0] if len(ids) == 1 else None


class KeywordsStoppingCriteria(StoppingCriteria):
    """Stop a sequence once its generated text ends with one of ``keywords``.

    Only tokens produced after the prompt (``input_ids`` given at construction) are inspected.
    """

    def __init__(self, keywords: Sequence[str], tokenizer: Any, input_ids: torch.Tensor) -> None:
        self.keywords = list(keywords)
        self.tokenizer = tokenizer
        self.keyword_ids = [
            torch.tensor(tokenizer(k, add_special_tokens=False).input_ids, dtype=torch.long) for k in self.keywords
        ]
        self.keyword_ids = [ids for ids in self.keyword_ids if ids.numel() > 0]
        self.max_keyword_len = max((ids.numel() for ids in self.keyword_ids), default=1)
        self.start_len = input_ids.shape[1]

    def _row_done(self, row: torch.Tensor) -> bool:
        generated = row[self.start_len :]
        if generated.numel() == 0:
            return False
        for ids in self.keyword_ids:
            n = ids.numel()
            if generated.numel() >= n and torch.equal(generated[-n:].cpu(), ids):
                return True
        # The model may spell a keyword with different tokens than the tokenizer would; the extra
        # tokens of slack let such spellings reach the whole keyword.
        window = generated[-(self.max_keyword_len + 2) :].tolist()
        text = self.tokenizer.decode(window, skip_special_tokens=False)
        return any(text.endswith(k) for k in self.keywords)

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        done = [self._row_done(row) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
