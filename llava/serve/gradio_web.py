"""Chat with a Slow-Fast video LLM about a video in the browser (a Gradio web demo).

    pip install -e ".[demo]"
    python -m llava.serve.gradio_web                          # the bundled tiny checkpoint, http://127.0.0.1:7860
    python -m llava.serve.gradio_web --model-path CKPT --port 8000 --max-upload-mb 500

Upload a video (or take the bundled ``assets/demo.mp4``), look at the frames the model sees, and ask any number
of questions about it: the video is encoded once and every turn reuses its tokens. Answers stream in token by
token; under each one the page shows its token counts and where the time went.

The server binds to 127.0.0.1 unless ``--host`` says otherwise, and it works offline: Gradio's analytics and
version check are turned off (``GRADIO_ANALYTICS_ENABLED=False`` unless set) and the page needs no CDN.
Files over ``--max-upload-mb`` are refused at the upload, and anything that does not decode as a video (or an
image) gets a visible refusal instead of an answer.

Concurrency: every browser session gets its own :class:`UserState` (conversation and video tokens) while the
weights are loaded once and shared. Answers are generated at most ``--concurrency`` (default 1) at a time
(Gradio's queue shows the others their place in line); reading and encoding videos runs in a separate queue
group, so another user's upload and frame strip are not held up by a long answer. A per-session lock keeps one
user's own events (a new upload during an answer, a double submit) from interleaving on that user's session.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llava.conversation import conv_templates
from llava.mm_utils import frame_count_warning, get_model_name_from_path, trained_video_frames
from llava.model.builder import CheckpointError, load_pretrained_model
from llava.serve.cli import AnswerStats, ChatSession, GenerationSettings, VideoStats
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
from llava.media_gate import UPLOAD_LIMITS
from llava.video import VideoClip, VideoLoadError, load_video

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MODEL_PATH",
    "DEMO_VIDEO",
    "SharedModel",
    "UploadRefused",
    "UserState",
    "WebOptions",
    "build_demo",
    "build_parser",
    "main",
]

logger = logging.getLogger(__name__)

# Before Gradio is imported (only inside functions below): no telemetry, no version check, so it works offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_PATH = REPO_ROOT / "assets" / "tiny-slowfast"
DEMO_VIDEO = REPO_ROOT / "assets" / "demo.mp4"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 200.0
MAX_FRAMES_SLIDER = 128
MAX_NEW_TOKENS_SLIDER = 2048
VIDEO_CONCURRENCY = 2  # videos decoded and encoded at the same time, whatever the answers are doing
THUMBNAIL_HEIGHT = 160  # px of each frame in the strip
GENERATE_GROUP = "generate"
VIDEO_GROUP = "video"
MB = 1024 * 1024


# --------------------------------------------------------------------------------------------------- model


@dataclass
class SharedModel:
    """The weights, tokenizer and image processor every browser session shares (loaded once)."""

    tokenizer: Any
    model: Any
    image_processor: Any
    context_len: int | None = None
    conv_mode: str = "qwen_1_5"

    def new_session(self) -> ChatSession:
        """A fresh conversation on the shared weights."""
        return ChatSession(
            self.tokenizer, self.model, self.image_processor, conv_mode=self.conv_mode, context_len=self.context_len
        )


def load_shared_model(args: argparse.Namespace) -> SharedModel:
    """Load the checkpoint named on the command line."""
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        args.model_path,
        args.model_base,
        get_model_name_from_path(args.model_path),
        device=args.device,
        torch_dtype=None if args.dtype == "auto" else args.dtype,
    )
    return SharedModel(tokenizer, model, image_processor, context_len, args.conv_mode)


# --------------------------------------------------------------------------------------------------- session


class UploadRefused(ValueError):
    """An upload the demo will not read; the message is shown on the page."""


@dataclass
class UserState:
    """One browser session: its conversation (with the video's tokens) and what the chat shows."""

    session: ChatSession
    messages: list[dict[str, str]] = field(default_factory=list)
    video_path: str | None = None
    video_name: str | None = None
    pending_clip: tuple[VideoClip, float] | None = None  # decoded, shown, not yet encoded
    pending_question: str | None = None
    frame_warning: str | None = None  # shown under the video's status while its frame count is untrained
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __deepcopy__(self, memo: dict[int, Any]) -> UserState:
        """A separate user with a copy of this one's conversation, on the same model, with a lock of its own.

        Gradio sets a session's state from ``gr.State``'s factory when the page loads; an event that reaches the
        server before that load (a fast first upload on a busy server) makes Gradio call the factory and
        deep-copy its result instead, which a lock cannot survive.
        """
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            setattr(copied, name, threading.Lock() if name == "lock" else copy.deepcopy(value, memo))
        return copied

    @property
    def has_video(self) -> bool:
        return self.session.visual_tokens is not None

    def new_conversation(self) -> None:
        """Forget the questions and answers; keep the video and its tokens."""
        self.session.reset()
        self.messages = []
        self.pending_question = None

    def forget_video(self) -> None:
        """Drop the video (after a refused upload) and the conversation about it."""
        self.session.visual_tokens = None
        self.session.video = None
        self.video_path = self.video_name = None
        self.pending_clip = None
        self.frame_warning = None
        self.new_conversation()


@dataclass
class WebOptions:
    """Page settings: the upload limit and the sliders' initial values."""

    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * MB)
    max_frames: int | None = None  # None: the checkpoint's trained count (video_frames / mm_training_video_frames)
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    concurrency: int = 1
    demo_video: Path | None = DEMO_VIDEO


def format_size(size: int) -> str:
    """``1536`` -> ``'1.5 KB'`` (powers of 1024)."""
    value, unit = float(size), "bytes"
    for bigger in ("KB", "MB", "GB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"


def decode_upload(path: str, max_frames: int, max_bytes: int, name: str | None = None) -> tuple[VideoClip, float]:
    """Check the size of ``path`` and decode ``max_frames`` frames; returns the clip and the seconds it took.

    Raises :class:`UploadRefused` (shown to the user as is) for a file over ``max_bytes`` or one that is not a
    readable video or image.
    """
    name = name or os.path.basename(path)
    if not os.path.isfile(path):
        raise UploadRefused(f"`{name}` is not a file")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise UploadRefused(f"`{name}` is {format_size(size)}, over the upload limit of {format_size(max_bytes)}")
    start = time.perf_counter()
    try:
        clip = load_video(path, max_frames, limits=UPLOAD_LIMITS)  # an upload: decoding work and time bounded
    except VideoLoadError as err:
        raise UploadRefused(f"`{name}` is not a video this demo can read ({err.cause})") from err
    return clip, time.perf_counter() - start


def frame_strip(clip: VideoClip, height: int = THUMBNAIL_HEIGHT) -> list[tuple[Any, str]]:
    """The sampled frames as (thumbnail, caption) pairs; the caption is the frame's time in the video."""
    from PIL import Image

    strip = []
    for frame, second in zip(clip.frames, clip.frame_times):
        image = Image.fromarray(frame)
        if image.height > height:
            image = image.resize((max(1, round(image.width * height / image.height)), height), Image.BILINEAR)
        strip.append((image, f"{second:.2f} s"))
    return strip


def describe_video(name: str, video: VideoStats) -> str:
    """Markdown status of a loaded video."""
    return (
        f"**{name}**: {video.frames} frames ({video.width}×{video.height}, {video.duration:.2f} s of video, "
        f"{video.backend}) · decoded in {video.decode_s:.3f} s · encoded once in {video.encode_s:.3f} s into "
        f"{video.fast_tokens} fast + {video.slow_tokens} slow tokens, reused by every question"
    )


def describe_answer(answer: AnswerStats) -> str:
    """Markdown line of token counts and timings of one answer."""
    rate = answer.decode_tokens_per_s
    speed = f" ({rate:.1f} tokens/s)" if rate is not None else ""
    return (
        f"**Last answer**: {answer.new_tokens} tokens generated · prefill {answer.prefill_s:.3f} s (time to first "
        f"token) · decode {answer.decode_s:.3f} s{speed} · prompt: {answer.fast_tokens} fast + "
        f"{answer.slow_tokens} slow video tokens, {answer.text_tokens} text tokens"
    )


def settings_from_sliders(temperature: float, top_p: float, max_new_tokens: float) -> GenerationSettings:
    """The sliders' values as :class:`GenerationSettings` (``top_p == 1`` means no nucleus sampling)."""
    return GenerationSettings(
        temperature=float(temperature),
        top_p=None if float(top_p) >= 1 else float(top_p),
        max_new_tokens=int(max_new_tokens),
    )


class _Cancelled(Exception):
    """Raised inside the answer's text callback once the page stopped listening."""


@dataclass
class _Finished:
    answer: AnswerStats


@dataclass
class _Failed:
    error: BaseException


def stream_answer(session: ChatSession, question: str) -> Iterator[tuple[str, AnswerStats | None]]:
    """Ask ``question`` and yield ``(text so far, None)`` per streamed piece, then ``(text, stats)`` once.

    Closing the generator early (the user left) stops the generation when it hands over its next piece of
    text; the question is then dropped from the session's history, as :meth:`ChatSession.ask` does on an error.
    """
    pieces: queue.Queue[str | _Finished | _Failed] = queue.Queue()
    cancelled = threading.Event()

    def on_text(piece: str) -> None:
        if cancelled.is_set():
            raise _Cancelled
        pieces.put(piece)

    def work() -> None:
        try:
            pieces.put(_Finished(session.ask(question, on_text=on_text)))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            pieces.put(_Failed(err))

    worker = threading.Thread(target=work, name="llava-web-answer", daemon=True)
    worker.start()
    text = ""
    try:
        while True:
            item = pieces.get()
            if isinstance(item, str):
                text += item
                yield text, None
            elif isinstance(item, _Finished):
                yield item.answer.text.strip(), item.answer
                return
            else:
                raise item.error
    finally:
        cancelled.set()
        worker.join()


# --------------------------------------------------------------------------------------------------- page


def _with_warning(status: str, user: UserState) -> str:
    """``status`` followed by the user's frame-count warning, if any."""
    return f"{status}\n\n**Warning**: {user.frame_warning}" if user.frame_warning else status


def _log_unexpected(err: Exception, what: str) -> None:
    """Log the traceback of an error that is not the user's doing (the page shows only its message)."""
    if not isinstance(err, (ValueError, torch.cuda.OutOfMemoryError)):
        logger.error("%s failed", what, exc_info=err)


class _Handlers:
    """The page's event handlers, bound to the shared model and the options.

    Each returns the new :class:`UserState` first, then the values of the other outputs; ``gradio.skip()``
    leaves an output as it is.
    """

    def __init__(self, shared: SharedModel, options: WebOptions) -> None:
        import gradio as gr

        self.shared = shared
        self.options = options
        self.skip: Callable[[], Any] = gr.skip
        self._warned_frames: set[int] = set()  # frame counts already warned about in the server log

    def frame_warning(self, max_frames: int) -> str | None:
        """Why ``max_frames`` may answer worse than the checkpoint's trained count (None when it is that count);
        logged once per count, shown on the page every time."""
        message = frame_count_warning(max_frames, self.shared.model.config)
        if message and max_frames not in self._warned_frames:
            self._warned_frames.add(max_frames)
            logger.warning("%d frames: %s", max_frames, message)
        return message

    # -- video --------------------------------------------------------------------------------------------
    def decode(self, user: UserState, path: str | None, max_frames: float) -> tuple[Any, ...]:
        """Step 1 of loading a video: decode it and show its frames (no model involved).

        Outputs: user, frame strip, video status, chat, answer stats, upload box (emptied for the next file).
        """
        if not path:
            return user, *(self.skip() for _ in range(5))
        name = os.path.basename(path)
        with user.lock:
            try:
                clip, decode_s = decode_upload(path, int(max_frames), self.options.max_upload_bytes, name)
            except UploadRefused as err:
                user.forget_video()
                return user, None, f"**Refused**: {err}", user.messages, "", None
            user.pending_clip = (clip, decode_s)
            user.video_path, user.video_name = path, name
            user.frame_warning = self.frame_warning(int(max_frames))
        status = _with_warning(f"**{name}**: {len(clip.frames)} frames decoded in {decode_s:.3f} s, encoding…", user)
        return user, frame_strip(clip), status, self.skip(), self.skip(), None

    def encode(self, user: UserState) -> tuple[Any, ...]:
        """Step 2 of loading a video: encode the decoded frames once and start a new conversation.

        Outputs: user, video status, chat, answer stats.
        """
        with user.lock:
            if user.pending_clip is None:  # nothing decoded (refused, or no file)
                return user, self.skip(), self.skip(), self.skip()
            clip, decode_s = user.pending_clip
            user.pending_clip = None
            try:
                video = user.session.load_clip(clip, decode_s)
            except Exception as err:  # noqa: BLE001 - shown on the page instead of a bare "Error"
                _log_unexpected(err, "video encoding")
                user.forget_video()
                return user, f"**Cannot encode the video**: {err}", user.messages, ""
            user.messages = []
            user.pending_question = None
        return user, _with_warning(describe_video(user.video_name or "video", video), user), user.messages, ""

    def use_demo(self, user: UserState, max_frames: float) -> tuple[Any, ...]:
        demo = self.options.demo_video
        return self.decode(user, str(demo) if demo else None, max_frames)

    def reload(self, user: UserState, max_frames: float) -> tuple[Any, ...]:
        """A new frame count: read the current video again (nothing happens without one)."""
        return self.decode(user, user.video_path, max_frames)

    # -- chat ---------------------------------------------------------------------------------------------
    def submit(self, user: UserState, question: str) -> tuple[Any, ...]:
        """Show the question at once; :meth:`answer` (queued) answers it.

        Outputs: user, question box, chat, answer stats.
        """
        question = (question or "").strip()
        if not question:
            return user, self.skip(), self.skip(), self.skip()
        if user.pending_clip is not None or (not user.has_video and user.video_path):
            return user, self.skip(), self.skip(), "The video is still being encoded: ask again in a moment."
        if not user.has_video:
            return user, self.skip(), self.skip(), "Load a video first: upload one or use the demo video."
        if user.pending_question is not None:
            return user, self.skip(), self.skip(), "Wait for the current answer before asking again."
        user.pending_question = question
        user.messages = [*user.messages, {"role": "user", "content": question}]
        return user, "", user.messages, "waiting for the model…"

    def answer(
        self, user: UserState, temperature: float, top_p: float, max_new_tokens: float
    ) -> Iterator[tuple[Any, ...]]:
        """Stream the answer to the pending question into the chat. Outputs: user, chat, answer stats."""
        with user.lock:
            question = user.pending_question
            if question is None:
                return
            asked = user.messages  # ends with the question
            user.messages = asked[:-1]  # like the session's history, holds the question only once it is answered
            try:
                user.session.settings = settings_from_sliders(temperature, top_p, max_new_tokens)
                with contextlib.closing(stream_answer(user.session, question)) as stream:
                    for text, stats in stream:
                        shown = [*asked, {"role": "assistant", "content": text}]
                        yield user, shown, describe_answer(stats) if stats else "generating…"
                user.messages = shown
            except Exception as err:  # noqa: BLE001 - shown on the page; the session stays usable
                _log_unexpected(err, "answer")
                yield user, user.messages, f"**No answer**: {err}"
            finally:
                user.pending_question = None

    def new_conversation(self, user: UserState) -> tuple[Any, ...]:
        """Outputs: user, chat, answer stats."""
        with user.lock:
            user.new_conversation()
        return user, user.messages, ""


def _user_factory(shared: SharedModel) -> Callable[[], UserState]:
    """What ``gr.State`` calls for each new browser session.

    A plain closure on purpose: ``gr.State`` deep-copies its value, and a deep copy of a bound method or a
    ``functools.partial`` would copy the model along with it.
    """

    def new_user() -> UserState:
        return UserState(shared.new_session())

    return new_user


def build_demo(shared: SharedModel, options: WebOptions | None = None) -> Any:
    """The Gradio ``Blocks`` page; launch it with :func:`launch`."""
    import gradio as gr

    options = options or WebOptions()
    handlers = _Handlers(shared, options)
    default_frames = options.max_frames or shared.new_session().default_max_frames
    with gr.Blocks(title="Slow-Fast video chat", delete_cache=(3600, 3600)) as demo:
        user = gr.State(_user_factory(shared))
        gr.Markdown("## Slow-Fast video chat\nUpload a video, then ask about it. The video is encoded once; "
                    "every question reuses its tokens.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=280):
                upload = gr.File(label=f"Video (up to {format_size(options.max_upload_bytes)})", height=140,
                                 file_count="single", elem_id="video-upload")
                demo_button = gr.Button("Use the demo video", size="sm", visible=options.demo_video is not None)
                video_status = gr.Markdown(elem_id="video-status")
            with gr.Column(scale=3):
                strip = gr.Gallery(label="Frames the model sees", columns=8, height=150, object_fit="contain",
                                   elem_id="frame-strip", allow_preview=True)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chat = gr.Chatbot(label="Chat", height=360, elem_id="chat", render_markdown=False,
                                  feedback_options=None, buttons=["copy", "copy_all"])
                answer_stats = gr.Markdown(elem_id="answer-stats")
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about the video…", show_label=False, scale=5,
                                          elem_id="question", submit_btn=False)
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            with gr.Column(scale=1, min_width=280):
                with gr.Accordion("Settings", open=True):
                    trained = trained_video_frames(shared.model.config)
                    trained_note = f"; trained with {trained}" if trained else ""
                    frames = gr.Slider(1, max(MAX_FRAMES_SLIDER, default_frames), value=default_frames, step=1,
                                       label="Frames",
                                       info=f"sampled uniformly; a change re-reads the video{trained_note}")
                    temperature = gr.Slider(0, 2, value=options.temperature, step=0.05,
                                            label="Temperature", info="0 is greedy")
                    top_p = gr.Slider(0.05, 1, value=options.top_p, step=0.05, label="Top-p")
                    max_new_tokens = gr.Slider(1, max(MAX_NEW_TOKENS_SLIDER, options.max_new_tokens),
                                               value=options.max_new_tokens, step=1, label="Max new tokens")
                clear = gr.Button("New conversation", size="sm", elem_id="new-conversation")

        video_outputs = [user, strip, video_status, chat, answer_stats, upload]
        encode_outputs = [user, video_status, chat, answer_stats]
        video_queue = {"concurrency_id": VIDEO_GROUP, "concurrency_limit": VIDEO_CONCURRENCY}
        for event, fn, inputs in (
            (upload.upload, handlers.decode, [user, upload, frames]),
            (demo_button.click, handlers.use_demo, [user, frames]),
            (frames.release, handlers.reload, [user, frames]),
        ):
            event(fn, inputs, video_outputs, **video_queue).then(handlers.encode, [user], encode_outputs,
                                                                 **video_queue)

        for event in (question.submit, send.click):
            event(handlers.submit, [user, question], [user, question, chat, answer_stats], queue=False).then(
                handlers.answer, [user, temperature, top_p, max_new_tokens], [user, chat, answer_stats],
                concurrency_id=GENERATE_GROUP, concurrency_limit=options.concurrency,
            )
        for event in (clear.click, chat.clear):  # the chat's own trash button too: the session must forget
            event(handlers.new_conversation, [user], [user, chat, answer_stats], queue=False)
    return demo


# --------------------------------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m llava.serve.gradio_web``."""
    parser = ArgumentParser(
        prog="python -m llava.serve.gradio_web",
        description="Serve a web page to chat with a Slow-Fast video LLM about a video.",
    )
    parser.add_argument("--model-path", default=str(DEFAULT_MODEL_PATH),
                        help="checkpoint folder or hub id (default: the bundled tiny checkpoint assets/tiny-slowfast)")
    parser.add_argument("--model-base", default=None, help="base checkpoint of a LoRA adapter checkpoint")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to bind (default {DEFAULT_HOST}, this machine only; 0.0.0.0 for everyone)")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port to bind (default {DEFAULT_PORT})")
    parser.add_argument("--max-upload-mb", type=positive_float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"refuse uploads larger than this many MiB (default {DEFAULT_MAX_UPLOAD_MB:g})")
    parser.add_argument("--max-frames", type=positive_int, default=None,
                        help="initial frame count (default: the checkpoint's trained count, video_frames or "
                             "mm_training_video_frames, else 64)")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="initial temperature (0: greedy)")
    parser.add_argument("--top-p", type=probability, default=1.0, help="initial top-p (1: no nucleus sampling)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=512, help="initial answer length limit")
    parser.add_argument("--concurrency", type=positive_int, default=1,
                        help="answers generated at the same time (default 1; the others wait in the queue)")
    parser.add_argument("--conv-mode", default="qwen_1_5", choices=sorted(conv_templates), help="prompt template")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    return parser


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (1-65535), got {value}")
    return value


def options_from_args(args: argparse.Namespace) -> WebOptions:
    """The page settings the command line asks for."""
    return WebOptions(
        max_upload_bytes=int(args.max_upload_mb * MB),
        max_frames=args.max_frames,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        concurrency=args.concurrency,
    )


def launch(demo: Any, options: WebOptions, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
           block: bool = True) -> Any:
    """Start serving ``demo`` (queue on, upload limit enforced by the server); ``block=False`` returns at once."""
    demo.queue(default_concurrency_limit=VIDEO_CONCURRENCY)
    return demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=options.max_upload_bytes,
        share=False,
        ssr_mode=False,
        prevent_thread_lock=not block,
        quiet=not block,
        show_error=False,
    )


def _require_gradio() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError('the web demo needs gradio: pip install -e ".[demo]"') from None


def main(argv: list[str] | None = None) -> int:
    """Run the web demo with ``argv`` (default ``sys.argv[1:]``) until interrupted; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        _require_gradio()
    except UsageError as err:
        return fail(err)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0

    with quiet_libraries(verbose=False):
        try:
            check_model_path(args.model_path)
            shared = load_shared_model(args)
        except (ValueError, OSError) as err:  # CheckpointError is a ValueError
            if args.model_path == str(DEFAULT_MODEL_PATH) and not os.path.exists(args.model_path):
                err = CheckpointError(f"{err}: pass --model-path CHECKPOINT")
            return fail(err)
    print(f"model: {args.model_path} ({shared.model.device}, {shared.model.dtype})", file=sys.stderr, flush=True)
    demo = build_demo(shared, options_from_args(args))
    try:
        launch(demo, options_from_args(args), args.host, args.port)
    except OSError as err:  # e.g. the port is taken
        return fail(err)
    except KeyboardInterrupt:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
