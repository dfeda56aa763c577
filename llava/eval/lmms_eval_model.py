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
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
from llava.mm_utils import KeywordsStoppingCriteria, process_images, template_stop, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.slow_fast import SlowFastTokens
from llava.video import VideoLoadError, load_video

MODEL_ID = "slowfast_videomllm"
DEFAULT_NUM_FRAMES = 64
DEFAULT_MAX_NEW_TOKENS = 1024
VIDEO_BACKENDS = ("decord", "pyav", "auto")
DECODE_MODES = ("attend", "reference")
# Generation settings passed on to ``generate`` as they are, beside the ones handled explicitly.
PASSTHROUGH_GEN_KWARGS = ("top_k", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "min_new_tokens")
HANDLED_GEN_KWARGS = ("max_new_tokens", "temperature", "top_p", "num_beams", "do_sample", "until")


class UnreadableVisual(Exception):
    """A request's video or image could not be read; the request is scored as an empty answer."""

    def __init__(self, path: str, cause: str) -> None:
        super().__init__(f"{path}: {cause}")
        self.path, self.cause = path, cause


@dataclass(frozen=True)
class RequestSettings:
    """One request's generation settings, parsed from the task's ``generation_kwargs``.

    ``temperature == 0`` (or ``do_sample: false``) is greedy decoding; ``until`` lists the strings the
    answer is cut at.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    until: tuple[str, ...] = ()
    extra: tuple[tuple[str, Any], ...] = ()
    ignored: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_gen_kwargs(cls, gen_kwargs: dict[str, Any] | None, default_max_new_tokens: int) -> "RequestSettings":
        gen = dict(gen_kwargs or {})

        def number(name: str, kind: type, default: Any) -> Any:
            value = gen.get(name, default)
            if value is None:
                return default
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"generation_kwargs.{name}={value!r} is not a valid {kind.__name__}") from None

        max_new_tokens = number("max_new_tokens", int, default_max_new_tokens)
        temperature = number("temperature", float, 0.0)
        top_p = gen.get("top_p")
        top_p = None if top_p is None else number("top_p", float, None)
        num_beams = number("num_beams", int, 1)
        if max_new_tokens < 1:
            raise ValueError(f"generation_kwargs.max_new_tokens={max_new_tokens} must be positive")
        if temperature < 0:
            raise ValueError(f"generation_kwargs.temperature={temperature} must be >= 0")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"generation_kwargs.top_p={top_p} must be in (0, 1]")
        if num_beams < 1:
            raise ValueError(f"generation_kwargs.num_beams={num_beams} must be >= 1")
        # Sampling needs a positive temperature; an explicit ``do_sample: false`` wins over a temperature.
        do_sample = temperature > 0 and gen.get("do_sample", True) is not False
        until = gen.get("until") or ()
        if isinstance(until, str):
            until = (until,)
        if not all(isinstance(u, str) for u in until):
            raise ValueError(f"generation_kwargs.until={until!r} must be a string or a list of strings")
        extra = tuple(sorted((k, gen[k]) for k in PASSTHROUGH_GEN_KWARGS if gen.get(k) is not None))
        ignored = tuple(sorted(k for k in gen if k not in HANDLED_GEN_KWARGS + PASSTHROUGH_GEN_KWARGS))
        return cls(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else 0.0,
            top_p=top_p if do_sample else None,
            num_beams=num_beams,
            until=tuple(u for u in until if u),
            extra=extra,
            ignored=ignored,
        )

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.generate`` for these settings."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        if self.do_sample:
            kwargs.update(do_sample=True, temperature=self.temperature)
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        kwargs.update(dict(self.extra))
        return kwargs

    def cut(self, text: str) -> str:
        """``text`` up to the first ``until`` string."""
        for stop in self.until:
            if stop in text:
                text = text[: text.index(stop)]
        return text


def _as_int(name: str, value: Any, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number != float(value) or number < minimum:
        raise ValueError(f"{MODEL_ID}: model argument {name}={value!r} must be an integer >= {minimum}")
    return number


def _as_optional_float(name: str, value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0:
        raise ValueError(f"{MODEL_ID}: model argument {name}={value!r} must be a positive number (or None)")
    return number


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{MODEL_ID}: model argument {name}={value!r}: use one of {', '.join(choices)}")
    return value


class SlowFastVideoMLLM(lmms):
    """lmms-eval wrapper of a Slow-Fast checkpoint.

    Model arguments (``--model_args k=v,...``):
        pretrained: checkpoint folder or hub id (required).
        num_frames: frames sampled per video (default: the checkpoint's ``video_frames``, else 64).
        fps: sample at this rate, capped at ``num_frames`` (default: ``num_frames`` uniformly over the video).
        video_decode_backend: ``decord`` (default), ``pyav`` or ``auto`` (decord, then PyAV).
        conv_template: prompt template (default ``qwen_1_5``).
        device: ``cuda`` (default; CPU when CUDA is absent), ``cuda:N`` or ``cpu``. Under
            ``accelerate launch`` each process takes the GPU of its local rank.
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bfloat16``, ``float16`` or ``float32``.
        attn_implementation: ``auto`` (flash-attn when installed on CUDA, else SDPA), ``sdpa``, ``eager``
            or ``flash_attention_2``.
        cross_attn_decode_mode: ``attend`` (default: generated tokens read the slow tokens, as in training)
            or ``reference`` (the reference's decoding, to reproduce published numbers exactly).
        batch_size: requests per forward pass (default 1).
        max_new_tokens: answer length for tasks that do not set one (default 1024).
        video_cache_size: encoded videos kept for the next questions on the same video (default 4).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        num_frames: int | None = None,
        fps: float | None = None,
        video_decode_backend: str = "decord",
        conv_template: str = "qwen_1_5",
        device: str = "cuda",
        dtype: str = "auto",
        attn_implementation: str | None = "auto",
        cross_attn_decode_mode: str = "attend",
        batch_size: int | str = 1,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        video_cache_size: int = 4,
        max_batch_size: int | None = None,  # passed by lmms-eval's CLI; batches are ``batch_size``
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"{MODEL_ID}: unknown model argument(s) {', '.join(sorted(unknown))}; accepted: pretrained, "
                "num_frames, fps, video_decode_backend, conv_template, device, dtype, attn_implementation, "
                "cross_attn_decode_mode, batch_size, max_new_tokens, video_cache_size"
            )
        if not pretrained:
            raise ValueError(f"{MODEL_ID}: model argument pretrained= (a checkpoint path or hub id) is required")
        frames = _as_int("num_frames", num_frames) if num_frames is not None else None
        self.fps = _as_optional_float("fps", fps)
        self.video_decode_backend = _choice("video_decode_backend", video_decode_backend, VIDEO_BACKENDS)
        if self.video_decode_backend == "decord" and importlib.util.find_spec("decord") is None:
            raise ValueError(
                f"{MODEL_ID}: video_decode_backend=decord but decord is not installed; "
                "install it or pass video_decode_backend=pyav"
            )
        self.conv_template = _choice("conv_template", conv_template, sorted(conv_templates))
        cross_attn_decode_mode = _choice("cross_attn_decode_mode", cross_attn_decode_mode, DECODE_MODES)
        if str(batch_size).startswith("auto"):
            raise ValueError(f"{MODEL_ID}: batch_size={batch_size!r}: automatic batch sizes are not supported")
        self._batch_size = _as_int("batch_size", batch_size)
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
            torch_dtype=dtype,
            attn_implementation=attn_implementation,
            cross_attn_decode_mode=cross_attn_decode_mode,
        )
        self._device = self._model.device
        config = self._model.config
        self.num_frames = frames or getattr(config, "video_frames", None) or DEFAULT_NUM_FRAMES
        self.stop_string, self.stop_token_id = template_stop(self.conv_template, self._tokenizer)
        self._video_cache: OrderedDict[tuple, SlowFastTokens] = OrderedDict()
        self.unreadable: dict[str, str] = {}  # path -> cause, each reported once
        self._warned_ignored: set[str] = set()
        if self.rank == 0:
            logger.info(
                f"{MODEL_ID}: {pretrained} on {self._device} ({self._model.dtype}, {attn_implementation}), "
                f"{self.num_frames} frames{f' at {self.fps} fps' if self.fps else ''}, "
                f"decode mode {cross_attn_decode_mode}, batch size {self._batch_size}, "
                f"{self.world_size} process(es)"
            )

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
        tokens = []
        for item in visuals:
            if isinstance(item, Image.Image):
                pixels = process_images([item.convert("RGB")], self.image_processor, self._model.config)
                pixels = pixels if isinstance(pixels, torch.Tensor) else torch.stack(pixels)
                tokens.append(self._model.encode_images([pixels[0]])[0])
            elif isinstance(item, (str, os.PathLike)):
                tokens.append(self._encode_video(os.fspath(item)))
            else:
                raise UnreadableVisual(repr(item)[:80], f"unsupported visual input of type {type(item).__name__}")
        return tokens

    def _encode_video(self, path: str) -> SlowFastTokens:
        key = (path, self.num_frames, self.fps)
        if key in self._video_cache:
            self._video_cache.move_to_end(key)
            return self._video_cache[key]
        if path in self.unreadable:
            raise UnreadableVisual(path, self.unreadable[path])
        try:
            clip = load_video(path, self.num_frames, fps=self.fps, backend=self.video_decode_backend)
        except VideoLoadError as err:
            raise UnreadableVisual(path, err.cause) from err
        pixels = self.image_processor.preprocess(clip.frames, return_tensors="pt")["pixel_values"]
        tokens = self._model.encode_images([pixels])[0]
        if self.video_cache_size:
            self._video_cache[key] = tokens
            while len(self._video_cache) > self.video_cache_size:
                self._video_cache.popitem(last=False)
        return tokens

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

    def _visual_token_count(self, tokens: Sequence[SlowFastTokens]) -> int:
        return sum(t.fast.shape[0] for t in tokens)

    # -- generate_until ------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answer every request with its own generation settings; batches group requests whose settings
        are equal, in (task, document) order so that questions on one video reuse its encoding."""
        results: list[GenerationResult | None] = [None] * len(requests)
        settings = []
        for req in requests:
            parsed = RequestSettings.from_gen_kwargs(req.args[1], self.default_max_new_tokens)
            new = set(parsed.ignored) - self._warned_ignored
            if new:
                self._warned_ignored |= new
                logger.warning(f"{MODEL_ID}: generation_kwargs {sorted(new)} are not generation settings; ignored")
            settings.append(parsed)

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
            prepared = []
            for i in batch:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                try:
                    visual = self.encode_visuals(self._doc_visuals(doc_to_visual, task, split, doc_id))
                except UnreadableVisual as err:
                    self._report_unreadable(err)
                    results[i] = GenerationResult("", TokenCounts(input_tokens=0, output_tokens=0))
                    continue
                prepared.append((i, self._tokenize(self.build_prompt(context, len(visual))), visual))
            if prepared:
                texts = self._generate_batch(prepared, settings[batch[0]])
                for (i, ids, visual), (text, new_tokens) in zip(prepared, texts):
                    input_tokens = len(ids) - len(visual) + self._visual_token_count(visual)
                    results[i] = GenerationResult(text, TokenCounts(input_tokens=input_tokens, output_tokens=new_tokens))
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
        response into its ``str()``, which breaks every likelihood-scored task.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
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
                visual = self.encode_visuals(self._doc_visuals(doc_to_visual, task, split, doc_id))
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
                    results[i] = score
                    self.cache_hook.add_partial("loglikelihood", (parsed[i][0], parsed[i][1]), score)
                progress.update(len(chunk))
        progress.close()
        return [GenerationResult(pair) for pair in results]  # type: ignore[arg-type]

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
