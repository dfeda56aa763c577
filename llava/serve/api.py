"""An OpenAI-compatible HTTP server for video chat: ``/v1/chat/completions`` with videos in the messages.

    pip install -e ".[serve]"
    python -m llava.serve.api --model-path assets/tiny-slowfast                 # http://127.0.0.1:8000/v1
    python -m llava.serve.api --model-path CKPT --port 8080 --api-key SECRET --media-root /data/videos

Endpoints: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions``, ``GET /health``.

A user message's ``content`` is a string or a list of parts: ``{"type": "text", "text": ...}``,
``{"type": "video_url", "video_url": {"url": ...}}`` and ``{"type": "image_url", "image_url": {"url": ...}}``,
where the URL is a ``data:video/...;base64,`` / ``data:image/...;base64,`` URL, or (only with ``--media-root``)
a path or ``file://`` URL inside the media root. Each video or image becomes the ``<image>`` placeholder at its
place in the message (parts are joined by newlines), so ``[video, text]`` is the prompt the CLI builds.
Multi-turn histories, ``system``/``developer`` messages, ``max_tokens``/``max_completion_tokens``,
``temperature``, ``top_p``, ``stop``, ``seed``, ``n == 1`` and ``stream`` (server-sent events, with a final
usage chunk under ``stream_options={"include_usage": true}``) are supported. Options beyond OpenAI's schema go
in the request body next to them (``extra_body`` in the ``openai`` client): ``max_frames``, ``fps``,
``cross_attn_decode_mode`` (``"attend"`` or ``"reference"``) and ``ignore_eos``.

``usage.prompt_tokens`` counts the tokens in the language model's sequence (text plus fast tokens); the
extension ``usage.slowfast`` splits them into ``text_tokens`` and ``fast_tokens`` and adds the
``slow_tokens`` read through cross-attention, the number of ``videos`` and how many came from the cache.

Throughput: requests are decoded together in batches by :class:`~llava.serve.batching.BatchingEngine`, and
videos are cached by content hash, so a video sent again is neither decoded nor encoded again.

Safety: binds 127.0.0.1 unless ``--host`` says otherwise; ``--api-key`` (or ``SLOWFAST_API_KEY``) requires
``Authorization: Bearer KEY``; the request body, the frames per video and the decoded frames' bytes are
bounded; files are read only inside ``--media-root`` and remote URLs are never fetched. A bad request gets an
OpenAI-style JSON error (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status; the server
goes on serving the others. A client that disconnects has its generation stopped at the next token.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
except ImportError as err:  # pragma: no cover - only without the extra
    raise ImportError(f'the API server needs the "serve" extra: pip install -e ".[serve]" ({err})') from err

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import frame_count_warning, get_model_name_from_path, tokenizer_image_token, trained_video_frames
from llava.model.builder import load_pretrained_model
from llava.model.slow_fast import count_visual_tokens
from llava.serve.batching import (
    BatchingEngine,
    EngineBusy,
    EngineClosed,
    Failed,
    Finished,
    GenerationJob,
    SamplingParams,
    TextDelta,
    VisualInput,
)
from llava.serve.cli import DEFAULT_MAX_FRAMES
from llava.serve.media import MediaError, decode_media, resolve_media
from llava.serve.options import (
    ArgumentParser,
    UsageError,
    check_model_path,
    fail,
    non_negative_float,
    positive_float,
    positive_int,
    probability,
    quiet_libraries,
)

__all__ = [
    "ApiError",
    "ChatServer",
    "ServerOptions",
    "build_parser",
    "build_prompt",
    "create_app",
    "main",
    "serve_in_thread",
]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MB = 1024 * 1024
API_KEY_ENV = "SLOWFAST_API_KEY"
MAX_STOP_STRINGS = 4
# Fields of OpenAI's schema accepted and ignored (they do not change the answer).
IGNORED_FIELDS = frozenset(
    {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}
)
# Fields of OpenAI's schema this server does not implement: refused unless they hold their "off" value.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "verbosity": (None,),
}
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error"}


# --------------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A request the server answers with an OpenAI-style error: ``status`` (4xx for the client's mistakes),
    ``message`` naming the problem, ``param`` the request field at fault, ``code`` a machine-readable tag."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        if self.status >= 500:
            return "server_error"
        return _ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _as_api_error(err: BaseException) -> ApiError:
    """The error a client sees for ``err`` (no traceback: unexpected errors are logged, not sent)."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, MediaError):
        return ApiError(err.status, str(err), err.param, "invalid_media" if err.status == 400 else None)
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return ApiError(503, "the server ran out of GPU memory for this request: retry with fewer frames "
                             "(max_frames) or fewer concurrent requests", code="out_of_memory")
    if isinstance(err, ValueError):
        return ApiError(400, str(err))
    logger.error("request failed", exc_info=err)
    return ApiError(500, f"internal server error ({type(err).__name__})")


# --------------------------------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    """One chat message; ``content`` parts are checked by :func:`build_prompt`."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Any] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    """The body of ``POST /v1/chat/completions`` (OpenAI's fields this server reads, plus its extensions)."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # extensions
    max_frames: int | None = Field(default=None, ge=1)
    fps: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    cross_attn_decode_mode: Literal["attend", "reference"] | None = None
    ignore_eos: bool = False
    # accepted, ignored or refused unless off (see IGNORED_FIELDS and UNSUPPORTED_FIELDS)
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None


def _param_name(loc: tuple[Any, ...]) -> str:
    """``("messages", 0, "role")`` -> ``"messages[0].role"`` (pydantic's union-branch labels left out)."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in ("str", "list", "int", "float", "bool"):
            name += f".{part}" if name else part
    return name


def parse_request(data: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; raises :class:`ApiError` (400) naming the first bad field."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        request = ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        first = max(errors, key=lambda e: len(e["loc"]))  # the deepest: the most specific of a union's complaints
        param = _param_name(first["loc"])
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown field '{param}'", param) from None
        raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param or None) from None
    for name, allowed in UNSUPPORTED_FIELDS.items():
        value = getattr(request, name)
        if value is not None and not any(value == a for a in allowed if a is not None):
            raise ApiError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    if request.n not in (None, 1):
        raise ApiError(400, f"n={request.n}: this server returns one choice per request (n=1)", "n")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop: stop strings must not be empty", "stop")
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options")
    return request


@dataclass
class MediaRef:
    """A video or image part of a message: ``kind`` (``"video"``/``"image"``), its URL and the field's name."""

    kind: str
    url: str
    param: str


def _text_of_part(part: Any, param: str, role: str) -> tuple[str, MediaRef | None]:
    """``(text, None)`` for a text part, ``("<image>", MediaRef)`` for a video or image part."""
    if not isinstance(part, dict):
        raise ApiError(400, f"{param}: a content part must be an object with a 'type'", param)
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise ApiError(400, f"{param}.text: a text part needs a string 'text'", f"{param}.text")
        unknown = set(part) - {"type", "text"}
        if unknown:
            raise ApiError(400, f"{param}: unknown field '{min(unknown)}' in a text part", param)
        return text, None
    if kind in ("video_url", "image_url"):
        if role != "user":
            raise ApiError(400, f"{param}: only user messages may hold videos or images", param)
        value = part.get(kind)
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str):
            raise ApiError(400, f"{param}.{kind}: expected {{\"url\": \"...\"}}", f"{param}.{kind}")
        unknown = set(part) - {"type", kind} | (set(value) - {"url", "detail"} if isinstance(value, dict) else set())
        if unknown:
            raise ApiError(400, f"{param}: unknown field '{min(unknown)}' in a {kind} part", param)
        return DEFAULT_IMAGE_TOKEN, MediaRef("video" if kind == "video_url" else "image", url, f"{param}.{kind}")
    raise ApiError(
        400, f"{param}.type: unsupported content part type {kind!r}: use 'text', 'image_url' or 'video_url'",
        f"{param}.type", "unsupported_content_type",
    )


def build_prompt(messages: list[Message], conv_mode: str) -> tuple[str, list[MediaRef]]:
    """The prompt of ``conv_mode``'s template for ``messages``, and its videos/images in placeholder order.

    System (and developer) messages become the template's system prompt; consecutive messages of one role are
    joined by a newline; the turns must start and end with the user. Text is stripped, as the CLI strips a
    question and stores answers stripped, so a history sent back gives the CLI's prompt.
    """
    system: list[str] = []
    turns: list[list[Any]] = []  # [role, text]
    media: list[MediaRef] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        content = message.content
        if content is None:
            raise ApiError(400, f"{param}.content: a {message.role} message needs content", f"{param}.content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        pieces = []
        for j, part in enumerate(parts):
            text, ref = _text_of_part(part, f"{param}.content[{j}]", message.role)
            if ref is None:
                if DEFAULT_IMAGE_TOKEN in text:
                    raise ApiError(400, f"{param}.content: the text must not contain {DEFAULT_IMAGE_TOKEN}: send the "
                                        "video as a video_url part", f"{param}.content")
                text = text.strip()
            else:
                media.append(ref)
            if text:
                pieces.append(text)
        if not pieces:
            raise ApiError(400, f"{param}.content: the message is empty", f"{param}.content")
        text = "\n".join(pieces)
        if message.role in ("system", "developer"):
            system.append(text)
            continue
        if turns and turns[-1][0] == message.role:
            turns[-1][1] += "\n" + text
        else:
            turns.append([message.role, text])
    if not turns or turns[0][0] != "user":
        raise ApiError(400, "messages: the conversation must start with a user message", "messages")
    if turns[-1][0] != "user":
        raise ApiError(400, "messages: the last message must be from the user", "messages")
    conv = conv_templates[conv_mode].copy()
    if system:
        conv.system = "\n".join(system)
    for role, text in turns:
        conv.append_message(conv.roles[0 if role == "user" else 1], text)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt(), media


# --------------------------------------------------------------------------------------------------- server


@dataclass
class ServerOptions:
    """What the server allows and assumes.

    ``max_frames`` is the default frames per video (None: the checkpoint's trained count, else 64);
    ``max_frames_limit`` the most a request may ask for; ``max_decoded_bytes`` bounds one request's decoded
    frames (``frames x height x width x 3``); ``max_body_bytes`` the request body (base64 videos included);
    ``max_tokens`` the default answer length (cut to what the context leaves).
    """

    model_name: str
    api_key: str | None = None
    media_root: str | None = None
    max_body_bytes: int = 64 * MB
    max_frames: int | None = None
    max_frames_limit: int = 256
    max_media_per_request: int = 8
    max_decoded_bytes: int = 1024 * MB
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    decode_workers: int = 2


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


class ChatServer:
    """The model, its batching engine and the server's options: turns requests into engine jobs."""

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
        self.engine = engine or BatchingEngine(model, tokenizer, conv_mode=conv_mode)
        self.default_frames = options.max_frames or trained_video_frames(model.config) or DEFAULT_MAX_FRAMES
        self.created = int(time.time())
        self._warned_frames: set[int] = set()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    # -- life cycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        self.engine.start()
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.options.decode_workers, thread_name_prefix="llava-api-decode"
            )

    def stop(self) -> None:
        self.engine.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    @property
    def executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            raise EngineClosed("the server is not running")
        return self._executor

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

    def _visual_input(self, ref: MediaRef, frames: int, fps: float | None, budget: list[int]) -> VisualInput:
        options = self.options
        source = resolve_media(ref.url, ref.kind, ref.param, options.media_root, options.max_body_bytes)
        key = (source.digest, ref.kind, frames if ref.kind == "video" else 1, fps if ref.kind == "video" else None)
        tokens = self.engine.cache.get(key)
        if tokens is not None:
            return VisualInput(key, tokens.fast.shape[0], tokens.slow.shape[0], tokens=tokens, from_cache=True)
        clip = decode_media(source, frames, fps, budget[0])
        budget[0] -= clip.frames.nbytes
        pixels = self.image_processor.preprocess(clip.frames, return_tensors="pt")["pixel_values"]
        tower = self.model.get_vision_tower()
        fast, slow = count_visual_tokens(clip.frames.shape[0], tower.num_patches_per_side, self.model.slow_fast_params)
        return VisualInput(key, fast, slow, pixels=pixels)

    def prepare_body(self, body: bytes) -> PreparedRequest:
        """:meth:`prepare` the request whose JSON body is ``body``."""
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON ({err})") from None
        return self.prepare(parse_request(data))

    def prepare(self, request: ChatCompletionRequest) -> PreparedRequest:
        """Check ``request`` against the model and the limits, build its prompt and decode its media.

        Runs in a worker thread (decoding is slow); raises :class:`ApiError` or :class:`MediaError`.
        """
        if request.model != self.options.model_name:
            raise ApiError(404, f"the model '{request.model}' does not exist: this server serves "
                                f"'{self.options.model_name}'", "model", "model_not_found")
        prompt, refs = build_prompt(request.messages, self.conv_mode)
        if refs and self.image_processor is None:
            raise ApiError(400, "this checkpoint has no vision tower, so it cannot read videos or images", "messages")
        if len(refs) > self.options.max_media_per_request:
            raise ApiError(400, f"the messages hold {len(refs)} videos/images, over this server's limit of "
                                f"{self.options.max_media_per_request}", "messages")
        frames = self._frames_for(request) if any(r.kind == "video" for r in refs) else 1
        budget = [self.options.max_decoded_bytes]
        visuals = [self._visual_input(ref, frames, request.fps, budget) for ref in refs]

        input_ids = tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
        text_tokens = int(input_ids.shape[0]) - len(refs)
        fast = sum(v.fast_tokens for v in visuals)
        slow = sum(v.slow_tokens for v in visuals)
        prompt_tokens = text_tokens + fast
        limit = self.context_len
        if limit and prompt_tokens >= limit:
            raise ApiError(
                400, f"the prompt is {prompt_tokens} tokens long ({text_tokens} text + {fast} fast video tokens), "
                     f"beyond this model's context length of {limit}: use fewer frames (max_frames) or a shorter "
                     "conversation", "messages", "context_length_exceeded",
            )
        requested = request.max_completion_tokens or request.max_tokens
        room = limit - prompt_tokens if limit else None
        if requested is None:
            max_new = self.options.max_tokens if room is None else min(self.options.max_tokens, room)
        elif room is not None and requested > room:
            field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
            raise ApiError(
                400, f"{field}={requested} does not fit: the prompt takes {prompt_tokens} of this model's "
                     f"{limit} tokens of context, leaving {room}", field, "context_length_exceeded",
            )
        else:
            max_new = requested
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


# --------------------------------------------------------------------------------------------------- HTTP


class _Channel:
    """Hands a job's events from the engine's thread to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(self, event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    async def get(self) -> Any:
        return await self.queue.get()


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one over ``limit`` bytes.

    An oversized body is read to its end (discarded, up to 16x the limit) before the refusal, so the client
    gets the answer instead of a reset connection.
    """
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is over this server's limit of {limit / MB:.1f} MiB: send "
                              "smaller or fewer videos, or use --media-root paths", code="request_too_large")
    if declared.isdigit() and int(declared) > 16 * limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > 16 * limit:
            break
    if size > limit:
        raise too_large
    return b"".join(chunks)


async def _cancel_on_disconnect(request: Request, job: GenerationJob) -> None:
    """Cancel ``job`` when the client disconnects (run as a task while the job is open)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class _EventStream(StreamingResponse):
    """Server-sent events of one job; cancels the job when the client goes away, whatever the stream is doing."""

    def __init__(self, content: AsyncIterator[bytes], job: GenerationJob, watcher: asyncio.Task) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job
        self.watcher = watcher

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.stream_response(send)
        except OSError:  # the client is gone
            self.job.cancel()
        finally:
            self.watcher.cancel()
            if not self.job.done:
                self.job.cancel()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


def create_app(server: ChatServer) -> FastAPI:
    """The FastAPI application serving ``server``; starting it (its lifespan) starts the engine."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.stop)

    app = FastAPI(title="Slow-Fast video chat (OpenAI-compatible)", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return ApiError(err.status_code, str(err.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return ApiError(400, str(err)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        if isinstance(err, ClientDisconnect):  # gone while sending its body: nobody to answer
            return ApiError(400, "the client disconnected").response()
        return _as_api_error(err).response()

    def model_card() -> dict[str, Any]:
        return {"id": server.options.model_name, "object": "model", "created": server.created,
                "owned_by": "slowfast-llava"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "open_requests": server.engine.open_jobs}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        server.authorize(request.headers.get("authorization"))
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        server.authorize(request.headers.get("authorization"))
        if model_id != server.options.model_name:
            raise ApiError(404, f"the model '{model_id}' does not exist", "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        server.authorize(request.headers.get("authorization"))
        body = await _read_body(request, server.options.max_body_bytes)
        loop = asyncio.get_running_loop()
        try:  # parsing a large body and decoding its videos would hold up the event loop: a worker thread does it
            prepared = await loop.run_in_executor(server.executor, server.prepare_body, body)
        except (MediaError, ValueError) as err:
            raise _as_api_error(err) from None
        parsed = prepared.request

        channel = _Channel(loop)
        job = GenerationJob(prepared.input_ids, prepared.visuals, prepared.sampling, prepared.decode_mode, channel.put)
        try:
            server.engine.submit(job)
        except EngineBusy as err:
            raise ApiError(429, str(err), code="server_busy") from None
        except EngineClosed as err:
            raise ApiError(503, str(err)) from None
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.options.model_name}
        try:
            first = await channel.get()
            if parsed.stream:
                if isinstance(first, Failed):
                    raise _as_api_error(first.error)
                stream = _stream_events(first, channel, prepared, meta)
                response = _EventStream(stream, job, watcher)
                watcher = None  # the stream owns it now
                return response
            event = first
            while not isinstance(event, (Finished, Failed)):
                event = await channel.get()
            if isinstance(event, Failed):
                raise _as_api_error(event.error)
            return {
                **meta,
                "object": "chat.completion",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": event.text},
                    "finish_reason": _finish_reason(event.reason),
                    "logprobs": None,
                }],
                "usage": prepared.usage(event.completion_tokens),
                "system_fingerprint": None,
            }
        finally:
            if watcher is not None:
                watcher.cancel()
                if not job.done:
                    job.cancel()

    return app


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def _stream_events(first: Any, channel: _Channel, prepared: PreparedRequest,
                         meta: dict[str, Any]) -> AsyncIterator[bytes]:
    """The SSE chunks of one answer: the role, the text pieces, the finish reason, the usage if asked, [DONE]."""
    options = prepared.request.stream_options
    include_usage = bool(options and options.include_usage)
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse({**meta, "object": "chat.completion.chunk", "system_fingerprint": None,
                     "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra})

    yield chunk({"role": "assistant", "content": ""})
    event = first
    while True:
        if isinstance(event, TextDelta):
            if event.text:
                yield chunk({"content": event.text})
        elif isinstance(event, Finished):
            if event.reason == "cancelled":
                return
            yield chunk({}, _finish_reason(event.reason))
            if include_usage:
                yield _sse({**meta, "object": "chat.completion.chunk", "system_fingerprint": None, "choices": [],
                            "usage": prepared.usage(event.completion_tokens)})
            yield b"data: [DONE]\n\n"
            return
        elif isinstance(event, Failed):
            yield _sse(_as_api_error(event.error).body())
            return
        event = await channel.get()


# --------------------------------------------------------------------------------------------------- running


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free port the system picks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def serve_in_thread(
    app: FastAPI, host: str = DEFAULT_HOST, port: int = 0, *, startup_timeout: float = 60.0,
    shutdown_timeout: float = 30.0, log_level: str = "warning",
) -> Iterator[str]:
    """Serve ``app`` from a background thread for the duration of the ``with`` block; yields the base URL
    (``http://127.0.0.1:PORT``, a free port by default). The server is stopped when the block ends."""
    sock = bind_socket(host, port)
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="llava-api-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the API server stopped while starting (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API server did not start within {startup_timeout:g} s")
            time.sleep(0.01)
        yield _url(host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(shutdown_timeout)
        sock.close()


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m llava.serve.api``."""
    parser = ArgumentParser(
        prog="python -m llava.serve.api",
        description="Serve a Slow-Fast video LLM behind an OpenAI-compatible API (/v1/chat/completions).",
    )
    parser.add_argument("--model-path", required=True, help="checkpoint folder or hub id")
    parser.add_argument("--model-base", default=None, help="base checkpoint of a LoRA adapter checkpoint")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send (default: the checkpoint folder's name)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to bind (default {DEFAULT_HOST}, this machine only)")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else no key)")
    parser.add_argument("--media-root", default=None,
                        help="folder whose files requests may name by path or file:// URL (default: none; only "
                             "data URLs)")
    parser.add_argument("--max-body-mb", type=positive_float, default=64.0,
                        help="largest request body in MiB, base64 videos included (default 64)")
    parser.add_argument("--max-frames", type=positive_int, default=None,
                        help="frames per video when a request does not say (default: the checkpoint's trained "
                             "count, else 64)")
    parser.add_argument("--max-frames-limit", type=positive_int, default=256,
                        help="most frames per video a request may ask for (default 256)")
    parser.add_argument("--max-decoded-mb", type=positive_float, default=1024.0,
                        help="most MiB of decoded frames per request (frames x height x width x 3; default 1024)")
    parser.add_argument("--max-media", type=positive_int, default=8,
                        help="most videos and images per request (default 8)")
    parser.add_argument("--max-tokens", type=positive_int, default=512,
                        help="answer length when a request does not say (default 512, cut to the context left)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0,
                        help="temperature when a request does not say (default 0: greedy)")
    parser.add_argument("--top-p", type=probability, default=1.0, help="top_p when a request does not say")
    parser.add_argument("--max-batch-size", type=positive_int, default=8,
                        help="requests decoded together in one batch (default 8)")
    parser.add_argument("--batch-window-ms", type=non_negative_float, default=5.0,
                        help="how long the first queued request waits for others to join its batch (default 5)")
    parser.add_argument("--max-queue", type=positive_int, default=256,
                        help="requests queued or running before new ones get 429 (default 256)")
    parser.add_argument("--video-cache-size", type=int, default=32,
                        help="encoded videos kept for reuse, by content hash (default 32; 0: none)")
    parser.add_argument("--decode-workers", type=positive_int, default=2,
                        help="threads decoding request videos (default 2)")
    parser.add_argument("--conv-mode", default="qwen_1_5", choices=sorted(conv_templates), help="prompt template")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--cross-attn-decode-mode", default=None, choices=["attend", "reference"],
                        help="default decode mode (a request may choose its own; default: the checkpoint's)")
    parser.add_argument("--use-flash-attn", action="store_true", help="use flash-attn 2 when installed (CUDA)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0-65535), got {value}")
    return value


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def options_from_args(args: argparse.Namespace, model_name: str) -> ServerOptions:
    """The server options the command line asks for."""
    return ServerOptions(
        model_name=model_name,
        api_key=args.api_key,
        media_root=args.media_root,
        max_body_bytes=int(args.max_body_mb * MB),
        max_frames=args.max_frames,
        max_frames_limit=args.max_frames_limit,
        max_media_per_request=args.max_media,
        max_decoded_bytes=int(args.max_decoded_mb * MB),
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        decode_workers=args.decode_workers,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the API server with ``argv`` (default ``sys.argv[1:]``) until interrupted; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        if args.video_cache_size < 0:
            raise UsageError("argument --video-cache-size: must be >= 0")
        if args.media_root is not None and not os.path.isdir(args.media_root):
            raise UsageError(f"argument --media-root: '{args.media_root}' is not a folder")
        if args.max_frames and args.max_frames > args.max_frames_limit:
            raise UsageError("argument --max-frames: over --max-frames-limit")
    except UsageError as err:
        return fail(err)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    with quiet_libraries(verbose=False):
        try:
            check_model_path(args.model_path)
            tokenizer, model, image_processor, context_len = load_pretrained_model(
                args.model_path,
                args.model_base,
                get_model_name_from_path(args.model_path),
                device=args.device,
                torch_dtype=None if args.dtype == "auto" else args.dtype,
                use_flash_attn=args.use_flash_attn,
                cross_attn_decode_mode=args.cross_attn_decode_mode,
            )
        except (ValueError, OSError) as err:  # CheckpointError is a ValueError
            return fail(err)
    name = args.served_model_name or get_model_name_from_path(args.model_path)
    engine = BatchingEngine(
        model, tokenizer, conv_mode=args.conv_mode, max_batch_size=args.max_batch_size,
        batch_window_s=args.batch_window_ms / 1000, max_pending=args.max_queue, cache_size=args.video_cache_size,
    )
    server = ChatServer(tokenizer, model, image_processor, context_len, options_from_args(args, name),
                        conv_mode=args.conv_mode, engine=engine)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as err:
        return fail(f"cannot listen on {args.host}:{args.port}: {err}")
    if not _is_loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use the "
              "model", file=sys.stderr, flush=True)
    url = _url(args.host, sock.getsockname()[1])
    print(f"serving '{name}' ({model.device}, {model.dtype}) at {url}/v1", file=sys.stderr, flush=True)
    config = uvicorn.Config(create_app(server), log_level=args.log_level, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
