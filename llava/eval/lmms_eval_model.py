"""The lmms-eval model ``slowfast_videomllm``.

Registered through the entry point ``lmms_eval.models`` (see ``llava/eval/lmms_eval_manifest.py``), so the
released lmms-eval finds it without a fork::

    python -m lmms_eval --model slowfast_videomllm \\
        --model_args pretrained=PATH,num_frames=64 --tasks videomme --batch_size 1

What it does that the reference's wrapper did not: every request's own generation settings are honoured
(``max_new_tokens``, ``temperature``, ``top_p``, ``num_beams``, ``until``, ...); requests are batched; a video
used by several questions is decoded and encoded once (a small LRU cache); images work as well as videos;
``loglikelihood`` is implemented, so multiple-choice tasks scored by likelihood run; a video that cannot be
read is reported once, with its path, and its requests are scored as empty answers while the run goes on.

``protocol=reference`` switches every setting that differs from the reference wrapper's (decoder, frame
sampling, dtype, image preprocessing, decode mode, generation settings) to the reference's, to reproduce the
published numbers; explicit model arguments still win. Each logged sample records how its visual inputs were
sampled (frame indices and times) under ``token_counts.visuals``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger
from PIL import Image
from tqdm import tqdm
from transformers import StoppingCriteriaList

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import (
    KeywordsStoppingCriteria,
    frame_count_warning,
    process_images,
    template_stop,
    tokenizer_image_token,
    trained_video_frames,
)
from llava.model.builder import load_pretrained_model
from llava.model.slow_fast import SlowFastTokens
from llava.video import VideoLoadError, load_video
from llava.eval.protocol import (  # noqa: F401  (re-exported: the plugin's public names)
    DECODE_MODES,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_NUM_FRAMES,
    GENERATION_MODES,
    IMAGE_ASPECT_RATIOS,
    MODEL_ID,
    PROTOCOLS,
    REFERENCE_MAX_NEW_TOKENS,
    RequestSettings,
    VIDEO_BACKENDS,
    reference_frame_indices,
    resolve_protocol,
    _as_int,
    _as_optional_float,
    _choice,
)


@dataclass
class SampleRecord(TokenCounts):
    """Token counts plus how the request's visual inputs were read, for lmms-eval's samples file.

    lmms-eval 0.7.3 logs nothing per request from a model except ``TokenCounts.to_dict()`` (under
    ``token_counts``), so this subclass adds ``visuals`` (one dict per video or image: for a video its path,
    decoder, frame rate, length, and the sampled ``frame_indices`` and ``frame_times_s``) and
    ``truncated_tokens`` (prompt text tokens cut at ``tokenizer_model_max_length``).
    """

    visuals: list[dict[str, Any]] = field(default_factory=list)
    truncated_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = dict(super().to_dict())
        record["visuals"] = self.visuals
        record["truncated_tokens"] = self.truncated_tokens
        return record


class UnreadableVisual(Exception):
    """A request's video or image could not be read; the request is scored as an empty answer."""

    def __init__(self, path: str, cause: str) -> None:
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = path, cause


class SlowFastVideoMLLM(lmms):
    """lmms-eval wrapper of a Slow-Fast checkpoint.

    Model arguments (``--model_args k=v,...``):
        pretrained: checkpoint folder or hub id (required).
        protocol: ``default`` or ``reference`` (the reference wrapper's settings, which produced the published
            numbers). It sets the arguments marked (P) below; an argument given explicitly wins.
        num_frames: frames sampled per video (default: the checkpoint's trained count, ``video_frames`` or
            ``mm_training_video_frames``, else 64). A count other than the trained one is warned about.
        fps (P): sample at this rate, capped at ``num_frames``; ``none`` spreads ``num_frames`` uniformly over
            the video (default ``none``; ``reference``: 2, with the reference's exact frame indices).
        video_decode_backend (P): ``decord``, ``pyav`` or ``auto`` (decord, then PyAV) (``decord``;
            ``reference``: ``pyav``).
        conv_template: prompt template (default ``qwen_1_5``).
        device: ``cuda`` (default; CPU when CUDA is absent), ``cuda:N`` or ``cpu``. Under
            ``accelerate launch`` each process takes the GPU of its local rank.
        dtype (P): ``auto`` (bf16 on CUDA, fp32 on CPU), ``bfloat16``, ``float16`` or ``float32`` (``auto``;
            ``reference``: ``float16``). Pixels are cast to the same dtype.
        attn_implementation: ``auto`` (flash-attn when installed on CUDA, else SDPA), ``sdpa``, ``eager``
            or ``flash_attention_2``.
        cross_attn_decode_mode (P): ``attend`` (generated tokens read the slow tokens, as in training) or
            ``reference`` (the reference's decoding) (``attend``; ``reference``: ``reference``).
        image_aspect_ratio (P): single images are ``pad``-ded to a square before the processor's resize and
            centre crop, or only ``crop``-ped; ``config`` follows the checkpoint (``config``; ``reference``:
            ``crop``).
        generation (P): ``task`` (each request's own ``generation_kwargs``) or ``reference`` (greedy,
            ``max_new_tokens`` new tokens, no stop strings, whatever the task asks, as the reference ran)
            (``task``; ``reference``: ``reference``).
        batch_size: requests per forward pass (default 1).
        max_new_tokens: answer length for tasks that set none (default 1024; with ``generation=reference``
            the length of every answer, default 256).
        video_cache_size: encoded videos kept for the next questions on the same video (default 4).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        protocol: str = "default",
        num_frames: int | None = None,
        fps: float | str | None = None,
        video_decode_backend: str | None = None,
        conv_template: str = "qwen_1_5",
        device: str = "cuda",
        dtype: str | None = None,
        attn_implementation: str | None = "auto",
        cross_attn_decode_mode: str | None = None,
        image_aspect_ratio: str | None = None,
        generation: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int | None = None,
        video_cache_size: int = 4,
        max_batch_size: int | None = None,  # passed by lmms-eval's CLI; batches are ``batch_size``
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"{MODEL_ID}: unknown model argument(s) {', '.join(sorted(unknown))}; accepted: pretrained, "
                "protocol, num_frames, fps, video_decode_backend, conv_template, device, dtype, attn_implementation, "
                "cross_attn_decode_mode, image_aspect_ratio, generation, batch_size, max_new_tokens, video_cache_size"
            )
        if not pretrained:
            raise ValueError(f"{MODEL_ID}: model argument pretrained= (a checkpoint path or hub id) is required")
        self.protocol = protocol
        settings = resolve_protocol(
            protocol,
            video_decode_backend=video_decode_backend,
            fps=fps,
            dtype=dtype,
            image_aspect_ratio=image_aspect_ratio,
            cross_attn_decode_mode=cross_attn_decode_mode,
            generation=generation,
        )
        frames = _as_int("num_frames", num_frames) if num_frames is not None else None
        self.fps = _as_optional_float("fps", settings["fps"])
        self.video_decode_backend = _choice("video_decode_backend", settings["video_decode_backend"], VIDEO_BACKENDS)
        if self.video_decode_backend == "decord" and importlib.util.find_spec("decord") is None:
            raise ValueError(
                f"{MODEL_ID}: video_decode_backend=decord but decord is not installed; "
                "install it or pass video_decode_backend=pyav"
            )
        # Under the reference protocol each video's indices are checked against the reference wrapper's formula:
        # llava.video's fps sampling can round a tie the other way.
        self.reference_sampling = protocol == "reference" and self.fps is not None
        self.conv_template = _choice("conv_template", conv_template, sorted(conv_templates))
        cross_attn_decode_mode = _choice("cross_attn_decode_mode", settings["cross_attn_decode_mode"], DECODE_MODES)
        self.image_aspect_ratio = _choice("image_aspect_ratio", settings["image_aspect_ratio"], IMAGE_ASPECT_RATIOS)
        self.generation = _choice("generation", settings["generation"], GENERATION_MODES)
        if str(batch_size).startswith("auto"):
            raise ValueError(f"{MODEL_ID}: batch_size={batch_size!r}: automatic batch sizes are not supported")
        self._batch_size = _as_int("batch_size", batch_size)
        if max_new_tokens is None:
            max_new_tokens = REFERENCE_MAX_NEW_TOKENS if self.generation == "reference" else DEFAULT_MAX_NEW_TOKENS
        self.default_max_new_tokens = _as_int("max_new_tokens", max_new_tokens)
        self.video_cache_size = _as_int("video_cache_size", video_cache_size, minimum=0)

        on_gpu = str(device).startswith("cuda") and torch.cuda.is_available()
        # Under ``accelerate launch`` or ``torchrun`` each process evaluates its share of the documents and
        # takes the GPU of its local rank. lmms-eval builds its Accelerator before the model, so a CPU-only
        # run under torchrun may see a single-process accelerate state: the launcher's variables decide.
        self.accelerator = Accelerator()
        world_size = max(self.accelerator.num_processes, int(os.environ.get("WORLD_SIZE", "1")))
        if world_size > 1:
            self._rank = int(os.environ.get("RANK", self.accelerator.process_index))
            self._world_size = world_size
            if on_gpu:
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', self.accelerator.local_process_index))}"
        dev = torch.device("cuda" if on_gpu else "cpu")
        if dev.type == "cuda" and ":" in str(device):
            dev = torch.device(device)
        if attn_implementation in (None, "auto"):
            use_flash = dev.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
            attn_implementation = "flash_attention_2" if use_flash else "sdpa"

        self._tokenizer, self._model, self.image_processor, self.context_len = load_pretrained_model(
            pretrained,
            device=str(dev) if dev.type == "cuda" else "cpu",
            device_map=None,
            torch_dtype=settings["dtype"],
            attn_implementation=attn_implementation,
            cross_attn_decode_mode=cross_attn_decode_mode,
        )
        self._device = self._model.device
        config = self._model.config
        self.trained_frames = trained_video_frames(config)
        self.num_frames = frames or self.trained_frames or DEFAULT_NUM_FRAMES
        self.stop_string, self.stop_token_id = template_stop(self.conv_template, self._tokenizer)
        self._video_cache: OrderedDict[tuple, tuple[SlowFastTokens, dict[str, Any]]] = OrderedDict()
        self.unreadable: dict[str, str] = {}  # path -> cause, each reported once
        self._warned: set[str] = set()
        if self.rank == 0:
            sampling = f"{self.num_frames} frames"
            if self.fps:
                sampling = f"at most {sampling} at {self.fps:g} fps"
            logger.info(
                f"{MODEL_ID}: {pretrained} on {self._device} ({self._model.dtype}, {attn_implementation}), "
                f"protocol {protocol}: {sampling} ({self.video_decode_backend}), images {self.image_aspect_ratio}, "
                f"decode mode {cross_attn_decode_mode}, generation settings from the {self.generation}, "
                f"batch size {self._batch_size}, {self.world_size} process(es)"
            )
            mismatch = frame_count_warning(self.num_frames, config)
            if mismatch:
                logger.warning(f"{MODEL_ID}: {mismatch}")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(f"{MODEL_ID}: {message}")

    # -- properties lmms-eval reads ------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def eot_token_id(self) -> int | None:
        return self.stop_token_id if self.stop_token_id is not None else self._tokenizer.eos_token_id

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "SlowFastVideoMLLM":
        """As lmms-eval's, except that a ``batch_size``/``device`` in ``--model_args`` wins over the CLI's
        value instead of clashing with it (the CLI always passes its default ``--batch_size 1``)."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # -- inputs --------------------------------------------------------------------------------------------
    def _doc_visuals(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: int) -> list[Any]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        return [v for v in visuals if v is not None]

    @torch.no_grad()
    def encode_visuals(self, visuals: Sequence[Any]) -> list[SlowFastTokens]:
        """Visual tokens of each item: a video path (or image file, or frames folder) or a PIL image.

        Raises :class:`UnreadableVisual` when an item cannot be read.
        """
        return self.read_visuals(visuals)[0]

    @torch.no_grad()
    def read_visuals(self, visuals: Sequence[Any]) -> tuple[list[SlowFastTokens], list[dict[str, Any]]]:
        """:meth:`encode_visuals` plus, per item, how it was read (the ``visuals`` of :class:`SampleRecord`)."""
        tokens, records = [], []
        for item in visuals:
            if isinstance(item, Image.Image):
                tokens.append(self._encode_image(item))
                records.append({"image": list(item.size), "preprocess": self._image_preprocess()})
            elif isinstance(item, (str, os.PathLike)):
                video_tokens, record = self._encode_video(os.fspath(item))
                tokens.append(video_tokens)
                records.append(record)
            else:
                raise UnreadableVisual(repr(item)[:80], f"unsupported visual input of type {type(item).__name__}")
        return tokens, records

    def _image_preprocess(self) -> str:
        if self.image_aspect_ratio == "config":
            return "pad" if getattr(self._model.config, "image_aspect_ratio", None) == "pad" else "crop"
        return self.image_aspect_ratio

    def _encode_image(self, image: Image.Image) -> SlowFastTokens:
        # process_images pads only for "pad"; anything else leaves the processor's resize and centre crop.
        how = SimpleNamespace(image_aspect_ratio=self._image_preprocess())
        pixels = process_images([image.convert("RGB")], self.image_processor, how)
        pixels = pixels if isinstance(pixels, torch.Tensor) else torch.stack(pixels)
        return self._model.encode_images([pixels[0]])[0]

    def _encode_video(self, path: str) -> tuple[SlowFastTokens, dict[str, Any]]:
        key = (path, self.num_frames, self.fps, self.video_decode_backend, self.reference_sampling)
        if key in self._video_cache:
            self._video_cache.move_to_end(key)
            return self._video_cache[key]
        if path in self.unreadable:
            raise UnreadableVisual(path, self.unreadable[path])
        try:
            frames, record = self.sample_video(path)
        except VideoLoadError as err:
            raise UnreadableVisual(path, err.cause) from err
        pixels = self.image_processor.preprocess(frames, return_tensors="pt")["pixel_values"]
        entry = (self._model.encode_images([pixels])[0], record)
        if self.video_cache_size:
            self._video_cache[key] = entry
            while len(self._video_cache) > self.video_cache_size:
                self._video_cache.popitem(last=False)
        return entry

    def sample_video(self, path: str) -> tuple[np.ndarray, dict[str, Any]]:
        """Decode the frames of ``path`` this model reads, ``uint8`` ``[T, H, W, 3]``, and a record of them:
        ``path``, ``backend``, ``video_fps``, ``total_frames``, ``duration_s``, ``sampling`` and the
        ``num_frames`` sampled at ``frame_indices`` (source frame numbers) and ``frame_times_s`` (seconds).

        Raises :class:`llava.video.VideoLoadError` when the video cannot be read.
        """
        clip = load_video(path, self.num_frames, fps=self.fps, backend=self.video_decode_backend)
        frames, indices, times = clip.frames, list(clip.frame_indices), list(clip.frame_times)
        sampling = "uniform" if self.fps is None else f"{self.fps:g} fps"
        if self.reference_sampling:
            sampling = f"reference, {self.fps:g} fps"
            wanted = reference_frame_indices(clip.total_frames, clip.video_fps, self.fps, self.num_frames)
            if indices != wanted:
                exact = self._frames_at(path, wanted, clip.total_frames, clip.video_fps)
                if exact is not None:
                    frames, times = exact
                    indices = wanted
        record = {
            "path": path,
            "backend": clip.backend,
            "video_fps": round(float(clip.video_fps), 6),
            "total_frames": int(clip.total_frames),
            "duration_s": round(float(clip.duration), 3),
            "sampling": sampling,
            "num_frames": len(indices),
            "frame_indices": [int(i) for i in indices],
            "frame_times_s": [round(float(t), 3) for t in times],
        }
        return frames, record

    def _frames_at(
        self, path: str, wanted: list[int], total: int, video_fps: float
    ) -> tuple[np.ndarray, list[float]] | None:
        """Frames ``wanted`` (all among the reference's candidates, every ``step``-th frame) and their times,
        decoded by asking :func:`llava.video.load_video` for every candidate (all of them are held at once, at
        the source resolution); None, with a warning, when it does not return them."""
        step = max(round(video_fps / self.fps), 1)
        candidates = len(range(0, total, step))
        every = load_video(path, candidates, fps=self.fps, backend=self.video_decode_backend)
        position = {int(index): k for k, index in enumerate(every.frame_indices)}
        if not all(index in position for index in wanted):
            self._warn_once(
                f"indices:{path}",
                f"{path}: cannot decode the reference's frame indices {wanted}; "
                "using the frames sampled by llava.video instead",
            )
            return None
        times = list(every.frame_times)
        picked = [position[index] for index in wanted]
        return every.frames[picked], [times[k] for k in picked]

    def _report_unreadable(self, err: UnreadableVisual) -> None:
        if err.path not in self.unreadable:
            self.unreadable[err.path] = err.cause
            logger.warning(f"{MODEL_ID}: cannot read {err.path} ({err.cause}); its requests are scored as empty answers")

    def build_prompt(self, context: str, num_visuals: int, answer: str | None = None) -> str:
        """The chat prompt: ``num_visuals`` ``<image>`` markers before the task's text (kept where the task
        already placed exactly that many), then the assistant's turn (``answer`` appended, if given)."""
        text = context
        if text.count(DEFAULT_IMAGE_TOKEN) != num_visuals:
            text = text.replace(DEFAULT_IMAGE_TOKEN, "")
            if num_visuals:
                text = f"{DEFAULT_IMAGE_TOKEN}\n" * num_visuals + text
        conv = conv_templates[self.conv_template].copy()
        conv.append_message(conv.roles[0], text)
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        return prompt + answer if answer is not None else prompt

    def _tokenize(self, prompt: str) -> list[int]:
        return tokenizer_image_token(prompt, self._tokenizer, IMAGE_TOKEN_INDEX)

    def _pad_left(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        return ids.to(self._device), mask.to(self._device)

    def _prompt_length(self, ids: Sequence[int], tokens: Sequence[SlowFastTokens]) -> tuple[int, int]:
        """``(positions the model reads, text tokens cut)`` for a prompt: its text plus fast tokens, cut at
        ``tokenizer_model_max_length`` as ``generate`` does."""
        merged = len(ids) - len(tokens) + sum(t.fast.shape[0] for t in tokens)
        budget = getattr(self._model.config, "tokenizer_model_max_length", None)
        cut = max(0, merged - budget) if budget else 0
        return merged - cut, cut

    # -- generate_until ------------------------------------------------------------------------------------
    def _request_settings(self, gen_kwargs: dict[str, Any] | None) -> RequestSettings:
        if self.generation == "reference":
            if gen_kwargs:
                self._warn_once(
                    "generation=reference",
                    f"generation=reference: every answer is greedy, up to {self.default_max_new_tokens} tokens, "
                    "without stop strings, as the reference wrapper ran; the tasks' generation_kwargs are ignored",
                )
            return RequestSettings(max_new_tokens=self.default_max_new_tokens)
        parsed = RequestSettings.from_gen_kwargs(gen_kwargs, self.default_max_new_tokens)
        for name in parsed.ignored:
            self._warn_once(f"gen_kwargs:{name}", f"generation_kwargs {name!r} is not a generation setting; ignored")
        return parsed

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answer every request with its own generation settings; batches group requests whose settings
        are equal, in (task, document) order so that questions on one video reuse its encoding.

        Each result's ``token_counts`` is a :class:`SampleRecord`: how the visual inputs were sampled, and
        the prompt text cut at ``tokenizer_model_max_length``.
        """
        results: list[GenerationResult | None] = [None] * len(requests)
        settings = [self._request_settings(req.args[1]) for req in requests]

        def sort_key(i: int) -> tuple:
            _, _, _, doc_id, task, split = requests[i].args
            return (json.dumps(settings[i].__dict__, sort_keys=True, default=str), str(task), str(split), doc_id)

        order = sorted(range(len(requests)), key=sort_key)
        batches: list[list[int]] = []
        for i in order:
            if batches and len(batches[-1]) < self._batch_size and settings[batches[-1][0]] == settings[i]:
                batches[-1].append(i)
            else:
                batches.append([i])

        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="slowfast generate")
        for batch in batches:
            prepared, records = [], {}
            for i in batch:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                try:
                    visual, records[i] = self.read_visuals(self._doc_visuals(doc_to_visual, task, split, doc_id))
                except UnreadableVisual as err:
                    self._report_unreadable(err)
                    unread = [{"path": err.path, "error": err.cause}]
                    results[i] = GenerationResult("", SampleRecord(input_tokens=0, output_tokens=0, visuals=unread))
                    continue
                prepared.append((i, self._tokenize(self.build_prompt(context, len(visual))), visual))
            if prepared:
                texts = self._generate_batch(prepared, settings[batch[0]])
                for (i, ids, visual), (text, new_tokens) in zip(prepared, texts):
                    input_tokens, cut = self._prompt_length(ids, visual)
                    record = SampleRecord(input_tokens=input_tokens, output_tokens=new_tokens, visuals=records[i],
                                          truncated_tokens=cut)  # fmt: skip
                    results[i] = GenerationResult(text, record)
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), text)
            progress.update(len(batch))
        progress.close()
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _generate_batch(self, prepared: list, settings: RequestSettings) -> list[tuple[str, int]]:
        """``prepared``: ``(index, prompt ids, visual tokens)`` per request. Returns (answer, new tokens)."""
        input_ids, attention_mask = self._pad_left([ids for _, ids, _ in prepared])
        visual = [t for _, _, tokens in prepared for t in tokens]
        eos = getattr(self._model.generation_config, "eos_token_id", None)
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if self.stop_token_id is not None and self.stop_token_id not in eos_ids:
            eos_ids.append(self.stop_token_id)
        stops = list(settings.until) + ([self.stop_string] if self.stop_token_id is None and self.stop_string else [])
        kwargs = settings.generate_kwargs()
        if stops:
            # generate() driven by merged embeddings hands the criteria only the new tokens: nothing to skip.
            empty = torch.empty(len(prepared), 0, dtype=torch.long)
            kwargs["stopping_criteria"] = StoppingCriteriaList([KeywordsStoppingCriteria(stops, self._tokenizer, empty)])
        if eos_ids:
            kwargs["eos_token_id"] = eos_ids
        if self._tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = self._tokenizer.pad_token_id
        output = self._model.generate(input_ids, attention_mask=attention_mask, visual_tokens=visual, **kwargs)
        answers = []
        for row in output.tolist():
            length = len(row)
            for k, token in enumerate(row):
                if token in eos_ids:
                    length = k + 1
                    break
            text = self._tokenizer.decode(row[:length], skip_special_tokens=True)
            if self.stop_token_id is None and self.stop_string:
                text = text.split(self.stop_string)[0]
            answers.append((settings.cut(text).strip(), length))
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            f"{MODEL_ID} answers single-round tasks (generate_until and loglikelihood); "
            "multi-round tasks (output_type generate_until_multi_round) are not supported"
        )

    # -- loglikelihood -------------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """``(-log P(continuation | prompt), continuation is the greedy answer)`` per request.

        lmms-eval picks a multiple-choice answer with ``argmin`` over these values (its models return a
        loss), so the first value is the negative log-likelihood, summed over the continuation's tokens. The
        continuation is scored as the start of the assistant's turn, as the task wrote it. Requests on one
        document (the choices of a question) share one encoding of its video. A request whose video cannot be
        read gets ``(inf, False)``.

        Each pair is returned inside a ``GenerationResult``: lmms-eval 0.7.3 turns any other non-string
        response into its ``str()``, which breaks every likelihood-scored task. Its ``token_counts`` is a
        :class:`SampleRecord` holding how the visual inputs were sampled. Prompts are not cut at
        ``tokenizer_model_max_length``: that would cut the continuation being scored.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        records: list[list[dict[str, Any]]] = [[] for _ in requests]
        parsed = []
        for req in requests:
            args = req.args
            if len(args) == 2:  # unconditional choice probability (acc_mutual_info): no visual input
                context, continuation, doc_to_visual, doc_id, task, split = args[0], args[1], None, -1, "", ""
            else:
                context, continuation, doc_to_visual, doc_id, task, split = args
            if callable(continuation):
                continuation = continuation(self.task_dict[task][split][doc_id])
            if isinstance(continuation, list):
                continuation = continuation[0]
            parsed.append((context, str(continuation), doc_to_visual, doc_id, task, split))

        order = sorted(range(len(requests)), key=lambda i: (str(parsed[i][4]), str(parsed[i][5]), parsed[i][3], parsed[i][0]))
        groups: list[list[int]] = []
        for i in order:
            same_doc = groups and parsed[groups[-1][0]][3:] == parsed[i][3:] and parsed[groups[-1][0]][0] == parsed[i][0]
            if same_doc:
                groups[-1].append(i)
            else:
                groups.append([i])

        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="slowfast loglikelihood")
        for group in groups:
            context, _, doc_to_visual, doc_id, task, split = parsed[group[0]]
            try:
                visual, visual_records = self.read_visuals(self._doc_visuals(doc_to_visual, task, split, doc_id))
            except UnreadableVisual as err:
                self._report_unreadable(err)
                for i in group:
                    results[i] = (float("inf"), False)
                progress.update(len(group))
                continue
            prompt_ids = self._tokenize(self.build_prompt(context, len(visual)))
            for start in range(0, len(group), self._batch_size):
                chunk = group[start : start + self._batch_size]
                conts = [self._tokenizer(parsed[i][1], add_special_tokens=False).input_ids for i in chunk]
                for i, score in zip(chunk, self._score(prompt_ids, visual, conts)):
                    results[i], records[i] = score, visual_records
                    self.cache_hook.add_partial("loglikelihood", (parsed[i][0], parsed[i][1]), score)
                progress.update(len(chunk))
        progress.close()
        pairs = zip(results, records)
        return [GenerationResult(pair, SampleRecord(visuals=rec)) for pair, rec in pairs]  # type: ignore[arg-type]

    @torch.no_grad()
    def _score(
        self, prompt_ids: list[int], visual: list[SlowFastTokens], continuations: list[list[int]]
    ) -> list[tuple[float, bool]]:
        """Negative log-likelihood of each continuation after the same prompt, in one left-padded forward pass."""
        scores: list[tuple[float, bool] | None] = [(0.0, True) if not c else None for c in continuations]
        rows = [k for k, c in enumerate(continuations) if c]
        if not rows:
            return scores  # type: ignore[return-value]
        input_ids, attention_mask = self._pad_left([prompt_ids + continuations[k] for k in rows])
        mm = self._model.prepare_multimodal_inputs(
            input_ids, attention_mask, visual_tokens=visual * len(rows), padding_side="left"
        )
        keep = max(len(continuations[k]) for k in rows) + 1
        logits = self._model(
            inputs_embeds=mm.inputs_embeds,
            attention_mask=mm.attention_mask,
            position_ids=mm.position_ids,
            slow_tokens=mm.slow_tokens,
            slow_token_mask=mm.slow_token_mask,
            cross_attn_query_mask=mm.cross_attn_query_mask,
            use_cache=False,
            logits_to_keep=keep,
        ).logits
        # Left padding ends every row at the last position: the last ``c`` tokens are the continuation,
        # predicted by the ``c`` positions before them.
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for b, k in enumerate(rows):
            target = torch.tensor(continuations[k], device=logprobs.device)
            c = target.shape[0]
            predicted = logprobs[b, keep - 1 - c : keep - 1]
            nll = -predicted.gather(-1, target[:, None]).sum().item()
            greedy = bool((predicted.argmax(-1) == target).all())
            scores[k] = (nll, greedy)
        return scores  # type: ignore[return-value]
