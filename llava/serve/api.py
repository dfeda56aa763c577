"""An OpenAI-compatible HTTP server for video chat: ``/v1/chat/completions`` with videos in the messages.

    pip install -e ".[serve]"
    python -m llava.serve.api --model-path assets/tiny-slowfast                 # http://127.0.0.1:8000/v1
    python -m llava.serve.api --model-path CKPT --port 8080 --api-key SECRET --media-root /data/videos

Endpoints: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions``, ``GET /health`` and
``GET /metrics`` (Prometheus text format).

A user message's ``content`` is a string or a list of parts: ``{"type": "text", "text": ...}``,
``{"type": "video_url", "video_url": {"url": ...}}`` and ``{"type": "image_url", "image_url": {"url": ...}}``,
where the URL is a ``data:video/...;base64,`` / ``data:image/...;base64,`` URL, or (only with ``--media-root``)
a path or ``file://`` URL inside the media root. Each video or image becomes the ``<image>`` placeholder at its
place in the message (parts are joined by newlines), so ``[video, text]`` is the prompt the CLI builds.
Multi-turn histories, ``system``/``developer`` messages, ``max_tokens``/``max_completion_tokens``,
``temperature``, ``top_p``, ``stop``, ``seed``, ``n == 1``, ``logprobs``/``top_logprobs`` and ``stream``
(server-sent events, with a final usage chunk under ``stream_options={"include_usage": true}``) are supported.
Options beyond OpenAI's schema go in the request body next to them (``extra_body`` in the ``openai`` client):
``max_frames``, ``fps``, ``cross_attn_decode_mode`` (``"attend"`` or ``"reference"``) and ``ignore_eos``.

This module is the command line; the server lives in the package's other modules (see
:mod:`llava.serve`), and its public names are importable from here too.

Safety: every limit is an option below, checked before the work it bounds; docs/serving.md's Safety paragraph
lists what is refused and which option moves each limit.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

try:
    import uvicorn

    from llava.serve.app import bind_socket, create_app, serve_in_thread, url_of
except ImportError as err:  # pragma: no cover - only without the extra
    raise ImportError(f'the API server needs the "serve" extra: pip install -e ".[serve]" ({err})') from err

from llava.conversation import conv_templates
from llava.media_gate import MediaLimits
from llava.mm_utils import get_model_name_from_path
from llava.model.builder import load_pretrained_model
from llava.serve.batching import BatchingEngine
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
from llava.serve.prompt import MediaRef, build_prompt
from llava.serve.protocol import ApiError, ChatCompletionRequest, parse_request
from llava.serve.server import MB, SERVER_MEDIA_LIMITS, ChatServer, PreparedRequest, ServerOptions

__all__ = [
    "ApiError",
    "ChatCompletionRequest",
    "ChatServer",
    "MediaRef",
    "PreparedRequest",
    "ServerOptions",
    "bind_socket",
    "build_parser",
    "build_prompt",
    "create_app",
    "main",
    "options_from_args",
    "parse_request",
    "serve_in_thread",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "SLOWFAST_API_KEY"
_LIMITS = SERVER_MEDIA_LIMITS


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
    parser.add_argument("--max-decoded-mb", type=positive_float, default=2048.0,
                        help="most MiB of decoded frames and their preprocessed pixels per request (frames x "
                             "(height x width x 3 + 3 x S x S x 4), from the headers, before decoding; default 2048)")
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
                        help="requests held at once, from their first byte (reading, decoding, queued, generating) "
                             "before new ones get 429 (default 256)")
    limits = parser.add_argument_group("limits checked before the work they bound")
    limits.add_argument("--allowed-host", action="append", default=[], metavar="NAME", type=_host_name,
                        help="another host name this server answers to without --api-key (repeatable; '*': any)")
    limits.add_argument("--max-inflight-mb", type=positive_float, default=4096.0,
                        help="memory all requests held may reserve together: bodies, decoded frames, pixels "
                             "(default 4096; then 429)")
    limits.add_argument("--max-prompt-chars", type=positive_int, default=None,
                        help="most characters of text per request (default: the context length x the longest "
                             "token, the most a prompt that fits can have)")
    limits.add_argument("--max-video-seconds", type=positive_float, default=_LIMITS.max_duration_s,
                        help=f"longest video, from its header (default {_LIMITS.max_duration_s:g})")
    limits.add_argument("--max-source-frames", type=positive_int, default=_LIMITS.max_source_frames,
                        help=f"most frames in a video file, from its header (default {_LIMITS.max_source_frames})")
    limits.add_argument("--max-side", type=positive_int, default=_LIMITS.max_side,
                        help=f"most pixels of a frame's or image's width or height (default {_LIMITS.max_side})")
    limits.add_argument("--max-pixels", type=positive_int, default=_LIMITS.max_pixels,
                        help=f"most pixels of one frame or image (default {_LIMITS.max_pixels}, 4096 x 4096)")
    limits.add_argument("--max-decode-frames", type=positive_int, default=_LIMITS.max_decode_frames,
                        help="most frames the decoder may have to decode to reach the sampled ones, predicted "
                             f"from the keyframes (default {_LIMITS.max_decode_frames})")
    limits.add_argument("--max-decode-seconds", type=positive_float, default=_LIMITS.max_decode_seconds,
                        help="a video still decoding after this long is stopped (its decoding process is killed; "
                             f"default {_LIMITS.max_decode_seconds:g})")
    limits.add_argument("--vision-chunk-frames", type=positive_int, default=64,
                        help="most frames of new videos through the vision tower at once (default 64)")
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


def _host_name(text: str) -> str:
    """A host name or address as ``Host`` headers carry it (no scheme, path or port), or ``*``."""
    name = text.strip().lower()
    if name == "*" or (name and all(c.isalnum() or c in "-._:[]" for c in name) and not name.startswith(".")):
        return name
    raise argparse.ArgumentTypeError(f"expected a host name such as 'llava.internal' or '10.0.0.5', got {text!r}")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def options_from_args(args: argparse.Namespace, model_name: str) -> ServerOptions:
    """The server options the command line asks for."""
    limits = MediaLimits(
        max_side=args.max_side, max_pixels=args.max_pixels, max_duration_s=args.max_video_seconds,
        max_source_frames=args.max_source_frames, max_decode_frames=args.max_decode_frames,
        max_decode_seconds=args.max_decode_seconds,
    )
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
        max_queue=args.max_queue,
        max_inflight_bytes=int(args.max_inflight_mb * MB),
        max_prompt_chars=args.max_prompt_chars,
        media_limits=limits,
        host=args.host,
        allowed_hosts=tuple(args.allowed_host),
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
        if args.max_inflight_mb < args.max_body_mb:
            raise UsageError("argument --max-inflight-mb: under --max-body-mb (one request's body must fit)")
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
        vision_chunk_frames=args.vision_chunk_frames,
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
    url = url_of(args.host, sock.getsockname()[1])
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
