"""The API server's HTTP side: the FastAPI app, its routes, server-sent events, and serving it.

:func:`create_app` serves a :class:`~llava.serve.server.ChatServer`: ``GET /v1/models`` (and
``/v1/models/{id}``), ``POST /v1/chat/completions`` (streamed or not), ``GET /health`` and ``GET /metrics``.
Every request first passes the :class:`~llava.serve.guards.HostGuard` (an ASGI middleware, which also counts
answers by status for the metrics); a chat request then needs the API key (if set) and a JSON content type,
and is admitted (``--max-queue``) before its body is read. Its stages run on the server's thread pools
(parsing and planning on one, decoding on another), so a slow decode never holds up the event loop or a
text-only request. :func:`serve_in_thread` runs the app on a free port for tests and benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llava.serve.batching import EngineBusy, EngineClosed, Failed, Finished, GenerationJob, TextDelta
from llava.serve.guards import require_json
from llava.serve.limits import Ticket
from llava.serve.metrics import CONTENT_TYPE
from llava.serve.protocol import ApiError, as_api_error
from llava.serve.server import MB, ChatServer, PreparedRequest

__all__ = ["bind_socket", "create_app", "serve_in_thread", "url_of"]

_ROUTES = frozenset({"/v1/models", "/v1/chat/completions", "/health", "/metrics"})


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


class _Guard:
    """ASGI middleware: the host guard before anything else, and each answer's status counted."""

    def __init__(self, app: Any, server: ChatServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in _ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            self.server.host_guard.check(headers)
        except ApiError as err:
            self.server.metrics.answered(err.status, route)
            await err.response()(scope, receive, send)
            return
        status: list[int] = []

        async def send_counted(message: Any) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            if status:
                self.server.metrics.answered(status[0], route)


async def _read_body(request: Request, limit: int, ticket: Ticket) -> bytes:
    """The request body, its bytes reserved from the server's memory budget as they arrive; refuses (413) one
    over ``limit`` bytes.

    An oversized body is read to its end (discarded, up to 16x the limit) before the refusal, so the client
    gets the answer instead of a reset connection.
    """
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body is over this server's limit of {limit / MB:.1f} MiB: send "
                              "smaller or fewer videos, or use --media-root paths", code="request_too_large")
    if declared.isdigit() and int(declared) > 16 * limit:
        raise too_large
    if declared.isdigit() and int(declared) <= limit:
        ticket.reserve(int(declared), "the request body")
        reserved = int(declared)
    else:
        reserved = 0
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
            if size > reserved:
                ticket.reserve(size - reserved, "the request body")
                reserved = size
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


def _logprobs(entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    return None if entries is None else {"content": entries, "refusal": None}


class _EventStream(StreamingResponse):
    """Server-sent events of one job; cancels the job when the client goes away, whatever the stream is doing,
    and releases the request's admission ticket when it ends."""

    def __init__(self, content: AsyncIterator[bytes], job: GenerationJob, watcher: asyncio.Task,
                 ticket: Ticket) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job
        self.watcher = watcher
        self.ticket = ticket

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.stream_response(send)
        except OSError:  # the client is gone
            self.job.cancel()
        finally:
            self.watcher.cancel()
            if not self.job.done:
                self.job.cancel()
            self.ticket.close()
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


async def _stream_events(first: Any, channel: _Channel, prepared: PreparedRequest,
                         meta: dict[str, Any]) -> AsyncIterator[bytes]:
    """The SSE chunks of one answer: the role, the text pieces (with their log-probabilities when asked), the
    finish reason, the usage if asked, [DONE]."""
    options = prepared.request.stream_options
    include_usage = bool(options and options.include_usage)
    extra = {"usage": None} if include_usage else {}
    asked = prepared.request.logprobs_k is not None

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        return _sse({**meta, "object": "chat.completion.chunk", "system_fingerprint": None,
                     "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                     **extra})

    yield chunk({"role": "assistant", "content": ""}, logprobs=_logprobs([]) if asked else None)
    event = first
    while True:
        if isinstance(event, TextDelta):
            if event.text:
                yield chunk({"content": event.text}, logprobs=_logprobs(event.logprobs))
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
            yield _sse(as_api_error(event.error).body())
            return
        event = await channel.get()


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
    app.add_middleware(_Guard, server=server)

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
        return as_api_error(err).response()

    def model_card() -> dict[str, Any]:
        return {"id": server.options.model_name, "object": "model", "created": server.created,
                "owned_by": "slowfast-llava"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "open_requests": server.admission.open}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        server.authorize(request.headers.get("authorization"))
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

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
        arrived = time.perf_counter()
        server.authorize(request.headers.get("authorization"))
        require_json(request.headers)
        ticket = server.admission.enter()
        try:
            return await _answer(request, ticket, arrived)
        except BaseException as err:
            ticket.close()
            if isinstance(err, Exception) and not isinstance(err, (ApiError, ClientDisconnect)):
                raise as_api_error(err) from None  # answered by the ApiError handler, the connection kept
            raise

    async def _answer(request: Request, ticket: Ticket, arrived: float) -> Any:
        """Everything after admission; the ticket is closed by the caller on error, by the stream when it
        ends, or here when the whole answer is out."""
        loop = asyncio.get_running_loop()
        body = await _read_body(request, server.options.max_body_bytes, ticket)
        parsed = await loop.run_in_executor(server.pool("prepare"), server.parse, body)
        del body
        plan = await loop.run_in_executor(server.pool("prepare"), server.plan, parsed, ticket)
        if plan.needs_decoding:
            visuals = await loop.run_in_executor(server.pool("decode"), server.decode, plan)
        else:
            visuals = server.decode(plan)  # only cached media: nothing to decode
        prepared = await loop.run_in_executor(server.pool("prepare"), server.finish, plan, visuals)

        channel = _Channel(loop)
        job = GenerationJob(prepared.input_ids, prepared.visuals, prepared.sampling, prepared.decode_mode,
                            channel.put, logprobs=parsed.logprobs_k)
        try:
            server.engine.submit(job)
        except EngineBusy as err:
            raise ApiError(429, str(err), code="server_busy") from None
        except EngineClosed as err:
            raise ApiError(503, str(err)) from None
        server.metrics.prompt_tokens.inc(prepared.prompt_tokens)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.options.model_name}
        try:
            first = await channel.get()
            server.metrics.first_token_seconds.observe(time.perf_counter() - arrived)
            if parsed.stream:
                if isinstance(first, Failed):
                    raise as_api_error(first.error)
                response = _EventStream(_stream_events(first, channel, prepared, meta), job, watcher, ticket)
                watcher = None  # the stream owns it now, and the ticket
                return response
            event = first
            while not isinstance(event, (Finished, Failed)):
                event = await channel.get()
            if isinstance(event, Failed):
                raise as_api_error(event.error)
            ticket.close()
            return {
                **meta,
                "object": "chat.completion",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": event.text},
                    "finish_reason": _finish_reason(event.reason),
                    "logprobs": _logprobs(event.logprobs),
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


def url_of(host: str, port: int) -> str:
    """``http://host:port`` (IPv6 addresses in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.contextmanager
def serve_in_thread(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, startup_timeout: float = 60.0,
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
        yield url_of(host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(shutdown_timeout)
        sock.close()
