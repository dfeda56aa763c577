"""The API server's engine side: a validated request becomes a batching-engine job, in stages that each refuse
before they work.

:class:`ChatServer` holds the model, its :class:`~llava.serve.batching.BatchingEngine`, the server's
:class:`ServerOptions`, its admission control and its metrics. A request goes through

1. :meth:`ChatServer.parse`: the JSON body into a checked :class:`~llava.serve.protocol.ChatCompletionRequest`;
2. :meth:`ChatServer.plan`: the text bounded by characters, then by tokens counted incrementally; each medium
   resolved and its header read through the media gate; the visual tokens predicted from the headers' frame
   counts and the whole prompt checked against the context; the decoded frames and preprocessed pixels
   bounded per request and reserved from the server's memory budget. Nothing is decoded yet;
3. :meth:`ChatServer.decode` (on the decoding threads): the media decoded within the gate's limits (decoding
   work and time) and preprocessed;
4. :meth:`ChatServer.finish`: the exact prompt ids, the final context check and the sampling settings.
"""

from __future__ import annotations

import concurrent.futures
import hmac
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.media_gate import UPLOAD_LIMITS, MediaInfo, MediaLimits
from llava.mm_utils import clip_pixels, frame_count_warning, tokenizer_image_token, trained_video_frames
from llava.model.slow_fast import SlowFastTokens, count_visual_tokens
from llava.serve.batching import BatchingEngine, EngineClosed, SamplingParams, VisualInput
from llava.serve.guards import HostGuard
from llava.serve.limits import Admission, Ticket
from llava.serve.media import MediaSource, decode_media, media_path, probe_media, resolve_media
from llava.serve.metrics import ServerMetrics
from llava.serve.prompt import (
    MediaRef,
    bounded_token_count,
    build_prompt,
    check_text_size,
    longest_token_chars,
)
from llava.serve.protocol import ApiError, ChatCompletionRequest, parse_body
from llava.video import _select_indices

__all__ = ["SERVER_MEDIA_LIMITS", "ChatServer", "Plan", "PreparedRequest", "ServerOptions"]

logger = logging.getLogger("llava.serve.api")

MB = 1024 * 1024
DEFAULT_MAX_FRAMES = 64
PIXEL_BYTES = 4  # the image processor's float32
# What a server decodes at most unless told otherwise (each bound is a command-line option).
SERVER_MEDIA_LIMITS = UPLOAD_LIMITS


@dataclass
class ServerOptions:
    """What the server allows and assumes.

    ``max_frames`` is the default frames per video (None: the checkpoint's trained count, else 64);
    ``max_frames_limit`` the most a request may ask for; ``max_decoded_bytes`` bounds one request's decoded
    frames (``frames x height x width x 3``) plus their preprocessed pixels (``frames x 3 x S x S x 4``);
    ``max_body_bytes`` the request body (base64 videos included); ``max_tokens`` the default answer length (cut
    to what the context leaves); ``max_queue`` the requests held at once, from their first byte to their last;
    ``max_inflight_bytes`` the memory all of them may reserve together (bodies, decoded frames, pixels);
    ``max_prompt_chars`` the text characters of a request (None: the most a prompt that fits the context can
    have); ``media_limits`` the media gate's bounds; ``host`` and ``allowed_hosts`` the names the server
    answers to without an API key.
    """

    model_name: str
    api_key: str | None = None
    media_root: str | None = None
    max_body_bytes: int = 64 * MB
    max_frames: int | None = None
    max_frames_limit: int = 256
    max_media_per_request: int = 8
    max_decoded_bytes: int = 2048 * MB
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    decode_workers: int = 2
    prepare_workers: int = 4
    max_queue: int = 256
    max_inflight_bytes: int = 4096 * MB
    max_prompt_chars: int | None = None
    media_limits: MediaLimits = SERVER_MEDIA_LIMITS
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_frames_limit", "max_media_per_request", "max_decoded_bytes",
                     "max_tokens", "decode_workers", "prepare_workers", "max_queue", "max_inflight_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ServerOptions.{name} must be a positive integer, got {value!r}")
        for name in ("max_frames", "max_prompt_chars"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"ServerOptions.{name} must be a positive integer or None, got {value!r}")
        if self.max_inflight_bytes < self.max_body_bytes:
            raise ValueError("ServerOptions.max_inflight_bytes must be at least max_body_bytes (one request's body "
                             "must fit the server's memory budget)")
        if not isinstance(self.media_limits, MediaLimits):
            raise ValueError("ServerOptions.media_limits must be a llava.media_gate.MediaLimits")
        self.allowed_hosts = tuple(self.allowed_hosts)


@dataclass
class _Medium:
    """One video or image of a request while it is planned: where it is, what its header says, what it will
    cost. ``tokens`` is set when the cache already holds it (then nothing is decoded)."""

    ref: MediaRef
    source: MediaSource
    key: tuple[Any, ...]
    fast: int
    slow: int
    path: str | None = None
    info: MediaInfo | None = None
    frames: int = 1
    tokens: SlowFastTokens | None = None


@dataclass
class Plan:
    """A request checked against every limit that needs no decoding: its prompt, its media, its frame count."""

    request: ChatCompletionRequest
    prompt: str
    media: list[_Medium]
    frames: int
    ticket: Ticket
    needs_decoding: bool = field(init=False)

    def __post_init__(self) -> None:
        self.needs_decoding = any(m.tokens is None for m in self.media)


@dataclass
class PreparedRequest:
    """A validated request turned into the engine's job inputs, with its token counts."""

    request: ChatCompletionRequest
    input_ids: torch.Tensor
    visuals: list[VisualInput]
    sampling: SamplingParams
    decode_mode: str
    text_tokens: int
    fast_tokens: int
    slow_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return self.text_tokens + self.fast_tokens

    def usage(self, completion_tokens: int) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
            "slowfast": {
                "text_tokens": self.text_tokens,
                "fast_tokens": self.fast_tokens,
                "slow_tokens": self.slow_tokens,
                "videos": len(self.visuals),
                "videos_from_cache": sum(v.from_cache for v in self.visuals),
            },
        }


def _context_error(prompt_tokens: int, text_tokens: int, fast: int, limit: int, predicted: bool) -> ApiError:
    how = " (predicted from the videos' headers, before decoding)" if predicted else ""
    return ApiError(
        400, f"the prompt is {prompt_tokens} tokens long ({text_tokens} text + {fast} fast video tokens){how}, "
             f"beyond this model's context length of {limit}: use fewer frames (max_frames) or a shorter "
             "conversation", "messages", "context_length_exceeded",
    )


class ChatServer:
    """The model, its batching engine, the server's options, admission and metrics: turns requests into jobs."""

    def __init__(
        self,
        tokenizer: Any,
        model: Any,
        image_processor: Any,
        context_len: int | None,
        options: ServerOptions,
        *,
        conv_mode: str = "qwen_1_5",
        engine: BatchingEngine | None = None,
    ) -> None:
        if conv_mode not in conv_templates:
            raise ValueError(f"conv_mode={conv_mode!r}: use one of {sorted(conv_templates)}")
        if options.media_root is not None and not os.path.isdir(options.media_root):
            raise ValueError(f"--media-root '{options.media_root}' is not a folder")
        self.tokenizer = tokenizer
        self.model = model
        self.image_processor = image_processor
        self.context_len = context_len
        self.options = options
        self.conv_mode = conv_mode
        self.engine = engine or BatchingEngine(model, tokenizer, conv_mode=conv_mode, max_pending=options.max_queue)
        self.admission = Admission(options.max_queue, options.max_inflight_bytes)
        self.host_guard = HostGuard(options.host, options.allowed_hosts, enabled=not options.api_key)
        self.metrics = ServerMetrics(lambda: self.admission.open, lambda: self.engine.open_jobs,
                                     lambda: self.admission.reserved)
        self.engine.observer = self.metrics
        self.default_frames = options.max_frames or trained_video_frames(model.config) or DEFAULT_MAX_FRAMES
        self.longest_token = longest_token_chars(tokenizer)
        self.max_prompt_chars = options.max_prompt_chars
        if self.max_prompt_chars is None and context_len:
            self.max_prompt_chars = context_len * self.longest_token
        tower = model.get_vision_tower() if image_processor is not None else None
        self._image_size = tower.spec.image_size if tower is not None else 0
        self._grid = tower.num_patches_per_side if tower is not None else 0
        self.created = int(time.time())
        self._warned_frames: set[int] = set()
        self._pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}

    # -- life cycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self.engine.start()
        if not self._pools:
            self._pools = {
                "prepare": concurrent.futures.ThreadPoolExecutor(self.options.prepare_workers,
                                                                 thread_name_prefix="llava-api-prepare"),
                "decode": concurrent.futures.ThreadPoolExecutor(self.options.decode_workers,
                                                                thread_name_prefix="llava-api-decode"),
            }

    def stop(self) -> None:
        self.engine.stop()
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    def pool(self, name: str) -> concurrent.futures.ThreadPoolExecutor:
        """The ``"prepare"`` (parsing, planning) or ``"decode"`` (media decoding) threads."""
        if not self._pools:
            raise EngineClosed("the server is not running")
        return self._pools[name]

    # -- requests -----------------------------------------------------------------------------------------
    def authorize(self, header: str | None) -> None:
        """Raise :class:`ApiError` (401) unless ``header`` is ``Bearer <the API key>`` (or no key is set)."""
        key = self.options.api_key
        if not key:
            return
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    def parse(self, body: bytes) -> ChatCompletionRequest:
        """Stage 1: the JSON body as a checked request (400 naming the first bad field)."""
        return parse_body(body)

    def _frames_for(self, request: ChatCompletionRequest) -> int:
        frames = request.max_frames or self.default_frames
        if frames > self.options.max_frames_limit:
            raise ApiError(400, f"max_frames={frames} is over this server's limit of {self.options.max_frames_limit}",
                           "max_frames")
        message = frame_count_warning(frames, self.model.config)
        if message and frames not in self._warned_frames:
            self._warned_frames.add(frames)
            logger.warning("%d frames: %s", frames, message)
        return frames

    def _text_tokens(self, prompt: str, media: int) -> int:
        """Tokens of ``prompt``'s text (BOS included), refusing as soon as they certainly exceed the context."""
        limit = self.context_len
        pieces = prompt.split(DEFAULT_IMAGE_TOKEN)
        if not limit:
            return sum(len(self.tokenizer(p, add_special_tokens=False).input_ids) for p in pieces if p)
        bos = len(tokenizer_image_token("", self.tokenizer))
        used = bos
        for piece in pieces:
            count = bounded_token_count(piece, self.tokenizer, limit - used, self.longest_token) if piece else 0
            if count is None:
                raise ApiError(400, f"the prompt's text alone is over this model's context length of {limit} "
                                    "tokens: send a shorter conversation", "messages", "context_length_exceeded")
            used += count
        if used + media >= limit:
            raise _context_error(used + media, used, media, limit, predicted=media > 0)
        return used

    def _plan_medium(self, ref: MediaRef, frames: int, fps: float | None, ticket: Ticket) -> _Medium:
        options = self.options
        source = resolve_media(ref.url, ref.kind, ref.param, options.media_root, options.max_body_bytes)
        key = (source.digest, ref.kind, frames if ref.kind == "video" else 1, fps if ref.kind == "video" else None)
        tokens = self.engine.cache.get(key)
        if tokens is not None:
            return _Medium(ref, source, key, tokens.fast.shape[0], tokens.slow.shape[0], tokens=tokens)
        path = media_path(source, ticket.on_close)
        info = probe_media(source, path, options.media_limits)
        count = 1
        if ref.kind == "video":
            total = info.frames
            if total is None and info.duration and info.fps:
                total = math.ceil(info.duration * info.fps)
            count = len(_select_indices(total, info.fps or 1.0, frames, fps)) if total else frames
        fast, slow = count_visual_tokens(count, self._grid, self.model.slow_fast_params)
        return _Medium(ref, source, key, fast, slow, path=path, info=info, frames=count)

    def plan(self, request: ChatCompletionRequest, ticket: Ticket) -> Plan:
        """Stage 2: every check that needs no decoding, cheapest first; reserves the decoding's memory in
        ``ticket`` (which also removes the media's temporary files when it closes)."""
        if request.model != self.options.model_name:
            raise ApiError(404, f"the model '{request.model}' does not exist: this server serves "
                                f"'{self.options.model_name}'", "model", "model_not_found")
        check_text_size(request.messages, self.max_prompt_chars)
        prompt, refs = build_prompt(request.messages, self.conv_mode)
        if refs and self.image_processor is None:
            raise ApiError(400, "this checkpoint has no vision tower, so it cannot read videos or images", "messages")
        if len(refs) > self.options.max_media_per_request:
            raise ApiError(400, f"the messages hold {len(refs)} videos/images, over this server's limit of "
                                f"{self.options.max_media_per_request}", "messages")
        frames = self._frames_for(request) if any(r.kind == "video" for r in refs) else 1
        text_tokens = self._text_tokens(prompt, 0)
        media = [self._plan_medium(ref, frames, request.fps, ticket) for ref in refs]
        fast = sum(m.fast for m in media)
        if self.context_len and text_tokens + fast >= self.context_len:
            raise _context_error(text_tokens + fast, text_tokens, fast, self.context_len, predicted=True)
        self._check_answer_room(request, text_tokens + fast)
        budget = self.options.max_decoded_bytes
        needed = 0
        for medium in media:
            if medium.tokens is not None or medium.info is None:
                continue
            width, height = medium.info.width, medium.info.height
            cost = medium.frames * (width * height * 3 + 3 * self._image_size**2 * PIXEL_BYTES)
            if needed + cost > budget:
                raise ApiError(
                    413, f"{medium.ref.param}: {medium.frames} decoded frame(s) of {width}x{height} and their "
                         f"preprocessed pixels take {cost / MB:.1f} MiB, over the {(budget - needed) / MB:.1f} MiB "
                         "left of the server's per-request limit (--max-decoded-mb): send fewer frames (max_frames) "
                         "or a smaller video", medium.ref.param, "media_too_large",
                )
            needed += cost
        ticket.reserve(needed, "decoding this request's videos and images")
        return Plan(request, prompt, media, frames, ticket)

    def _check_answer_room(self, request: ChatCompletionRequest, prompt_tokens: int) -> int:
        """The answer's token limit; refuses a ``max_tokens`` the context cannot hold after the prompt."""
        limit = self.context_len
        requested = request.max_completion_tokens or request.max_tokens
        room = limit - prompt_tokens if limit else None
        if requested is None:
            return self.options.max_tokens if room is None else min(self.options.max_tokens, room)
        if room is not None and requested > room:
            name = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
            raise ApiError(
                400, f"{name}={requested} does not fit: the prompt takes {prompt_tokens} of this model's "
                     f"{limit} tokens of context, leaving {room}", name, "context_length_exceeded",
            )
        return requested

    def decode(self, plan: Plan) -> list[VisualInput]:
        """Stage 3 (decoding threads): decode and preprocess the media the cache does not hold."""
        started = time.perf_counter()
        budget = self.options.max_decoded_bytes
        visuals = []
        for medium in plan.media:
            if medium.tokens is not None:
                visuals.append(VisualInput(medium.key, medium.fast, medium.slow, tokens=medium.tokens,
                                           from_cache=True))
                continue
            clip = decode_media(medium.source, medium.path or "", plan.frames, plan.request.fps,
                                self.options.media_limits, budget)
            budget -= clip.frames.nbytes
            pixels = clip_pixels(clip, self.image_processor, self.model.config)
            fast, slow = count_visual_tokens(clip.frames.shape[0], self._grid, self.model.slow_fast_params)
            visuals.append(VisualInput(medium.key, fast, slow, pixels=pixels))
        if plan.needs_decoding:
            self.metrics.decode_seconds.observe(time.perf_counter() - started)
        return visuals

    def finish(self, plan: Plan, visuals: list[VisualInput]) -> PreparedRequest:
        """Stage 4: the prompt's ids, the final context check with the decoded frame counts, the sampling."""
        request = plan.request
        input_ids = tokenizer_image_token(plan.prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
        text_tokens = int(input_ids.shape[0]) - len(visuals)
        fast = sum(v.fast_tokens for v in visuals)
        slow = sum(v.slow_tokens for v in visuals)
        if self.context_len and text_tokens + fast >= self.context_len:
            raise _context_error(text_tokens + fast, text_tokens, fast, self.context_len, predicted=False)
        max_new = self._check_answer_room(request, text_tokens + fast)
        stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        sampling = SamplingParams(
            max_new_tokens=max_new,
            temperature=self.options.temperature if request.temperature is None else request.temperature,
            top_p=self.options.top_p if request.top_p is None else request.top_p,
            seed=request.seed,
            stop=tuple(stops),
            ignore_eos=request.ignore_eos,
        )
        return PreparedRequest(
            request=request,
            input_ids=input_ids,
            visuals=visuals,
            sampling=sampling,
            decode_mode=request.cross_attn_decode_mode or self.engine.default_decode_mode,
            text_tokens=text_tokens,
            fast_tokens=fast,
            slow_tokens=slow,
        )

    def prepare(self, request: ChatCompletionRequest, ticket: Ticket | None = None) -> PreparedRequest:
        """Stages 2 to 4 in the calling thread (the app runs them on its thread pools). Without a ``ticket`` the
        request is not counted, and its temporary files are removed on return."""
        own = ticket is None
        ticket = Admission(1, 2**62).enter() if ticket is None else ticket
        try:
            plan = self.plan(request, ticket)
            return self.finish(plan, self.decode(plan))
        finally:
            if own:
                ticket.close()

    def prepare_body(self, body: bytes, ticket: Ticket | None = None) -> PreparedRequest:
        """:meth:`prepare` the request whose JSON body is ``body``."""
        return self.prepare(self.parse(body), ticket)

