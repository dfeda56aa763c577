"""The wire protocol of the API server: the request schema, its validation, and OpenAI-style errors.

:func:`parse_body` turns a request body into a :class:`ChatCompletionRequest` (JSON nested at most
:data:`MAX_JSON_DEPTH` deep, every field checked, unknown fields refused by name); :class:`ApiError` is every
refusal the client sees (``{"error": {"message", "type", "param", "code"}}`` with its HTTP status), and
:func:`as_api_error` maps any other exception onto one: the client's mistakes stay 4xx, anything else is a
500 with a generic message and an id that the log repeats with the traceback.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any, Literal

import torch
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llava.serve.media import MediaError

__all__ = [
    "IGNORED_FIELDS",
    "MAX_JSON_DEPTH",
    "MAX_STOP_STRINGS",
    "MAX_TOP_LOGPROBS",
    "UNSUPPORTED_FIELDS",
    "ApiError",
    "ChatCompletionRequest",
    "Message",
    "StreamOptions",
    "as_api_error",
    "parse_body",
    "parse_request",
]

logger = logging.getLogger("llava.serve.api")

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
MAX_JSON_DEPTH = 64
# Fields of OpenAI's schema accepted and ignored (they do not change the answer).
IGNORED_FIELDS = frozenset(
    {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}
)
# Fields of OpenAI's schema this server does not implement: refused unless they hold their "off" value.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
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
                413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error"}


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


def as_api_error(err: BaseException) -> ApiError:
    """The error a client sees for ``err``.

    :class:`ApiError` as it is; :class:`~llava.serve.media.MediaError` with its status; out of GPU memory is
    503 (retry later or smaller). Anything else is the server's fault: 500 with a generic message and an
    error id; the traceback is logged under that id, never sent.
    """
    if isinstance(err, ApiError):
        return err
    if isinstance(err, MediaError):
        return ApiError(err.status, str(err), err.param, err.code)
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return ApiError(503, "the server ran out of GPU memory for this request: retry with fewer frames "
                             "(max_frames) or later", code="out_of_memory")
    error_id = getattr(err, "error_id", None) or uuid.uuid4().hex[:12]
    if not getattr(err, "logged", False):
        logger.error("internal error %s", error_id, exc_info=err)
    return ApiError(500, f"internal server error (error id {error_id}; the server's log has the details)",
                    code="internal_error")


# --------------------------------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Strict):
    """One chat message; ``content`` parts are checked by :func:`llava.serve.prompt.build_prompt`."""

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
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
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

    @property
    def logprobs_k(self) -> int | None:
        """``None`` without ``logprobs``; else how many alternatives each token lists (``top_logprobs``, 0)."""
        return (self.top_logprobs or 0) if self.logprobs else None


def _param_name(loc: tuple[Any, ...]) -> str:
    """``("messages", 0, "role")`` -> ``"messages[0].role"`` (pydantic's union-branch labels left out)."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in ("str", "list", "int", "float", "bool"):
            name += f".{part}" if name else part
    return name


def _depth(value: Any) -> int:
    """How deeply ``value`` nests lists and objects (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            items: Any = item.values()
        elif isinstance(item, list):
            items = item
        else:
            continue
        deepest = max(deepest, level)
        if level <= MAX_JSON_DEPTH:
            stack.extend((child, level + 1) for child in items)
    return deepest


def parse_body(body: bytes) -> ChatCompletionRequest:
    """:func:`parse_request` of a JSON body; refuses (400) invalid JSON and JSON nested over
    :data:`MAX_JSON_DEPTH` levels."""
    too_deep = ApiError(400, f"the request body nests lists and objects over {MAX_JSON_DEPTH} levels deep",
                        code="invalid_json")
    try:
        data = json.loads(body)
    except RecursionError:
        raise too_deep from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise too_deep
    return parse_request(data)


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
    if request.top_logprobs and not request.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise ApiError(400, "stop: stop strings must not be empty", "stop")
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options")
    return request
