"""Ask a Slow-Fast video LLM about a video from the command line.

    python -m llava.serve.cli --model-path CKPT --video clip.mp4 --question "What happens?"
    python -m llava.serve.cli --model-path CKPT --video clip.mp4 --interactive

The answer is streamed to stdout as it is generated; ``--verbose`` reports on stderr where the time went
and how many tokens the video and the text took. Bad input (a missing or undecodable video, a missing or
foreign checkpoint, an out-of-range option) ends with exit status 2 and a single ``error: ...`` line.

:class:`ChatSession` is the reusable core: it encodes a video once and answers any number of turns about it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import (
    KeywordsStoppingCriteria,
    clip_pixels,
    frame_count_warning,
    get_model_name_from_path,
    template_stop,
    tokenizer_image_token,
    trained_video_frames,
)
from llava.model.builder import load_pretrained_model
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
from llava.video import VideoClip, VideoLoadError, load_video

__all__ = ["AnswerStats", "ChatSession", "GenerationSettings", "VideoStats", "build_parser", "main"]

DEFAULT_MAX_FRAMES = 64
EXIT_INTERRUPTED = 130
QUIT_WORDS = frozenset({"exit", "quit"})
USER_PROMPT = "USER: "
ASSISTANT_PROMPT = "ASSISTANT: "


# --------------------------------------------------------------------------------------------------- session


@dataclass
class GenerationSettings:
    """How answers are sampled; ``temperature == 0`` is greedy decoding."""

    temperature: float = 0.0
    top_p: float | None = None
    max_new_tokens: int = 512

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")

    def generate_kwargs(self) -> dict[str, Any]:
        """The sampling arguments of ``model.generate``."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature)
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
        else:
            kwargs["do_sample"] = False
        return kwargs


@dataclass
class VideoStats:
    """What :meth:`ChatSession.load_video` (or :meth:`ChatSession.load_clip`) did: the frames it decoded and the
    tokens they became.

    ``encode_s`` covers preprocessing and the vision tower plus projector.
    """

    path: str
    frames: int
    height: int
    width: int
    backend: str
    duration: float
    decode_s: float
    encode_s: float
    fast_tokens: int
    slow_tokens: int


@dataclass
class AnswerStats:
    """One answer with its timings and token counts.

    ``text_tokens`` counts the prompt's text (the whole conversation so far, without the ``<image>``
    placeholder); ``fast_tokens``/``slow_tokens`` are the video's tokens in this prompt (0 without a video).
    ``prefill_s`` runs from the ``generate`` call to the first new token, ``decode_s`` from the first new
    token to the last.
    """

    text: str
    token_ids: list[int]
    prompt: str
    text_tokens: int
    fast_tokens: int
    slow_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Rate over the tokens after the first; None when there are fewer than two."""
        if self.new_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.new_tokens - 1) / self.decode_s


class _TimedStreamer(TextIteratorStreamer):
    """A text streamer that also notes when each generation step handed over its token."""

    def __init__(self, tokenizer: Any) -> None:
        # generate() first puts the prompt ids (empty when it is driven by inputs_embeds): skip them.
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.token_times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if not (self.skip_prompt and self.next_tokens_are_prompt):
            self.token_times.append(time.perf_counter())
        super().put(value)


class _StopOnEvent(StoppingCriteria):
    """Ends generation early once ``event`` is set (Ctrl-C, or a consumer that went away)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatSession:
    """A conversation with the model about one video.

    :meth:`load_video` decodes and encodes the video once (:meth:`load_clip` encodes frames decoded elsewhere);
    every :meth:`ask` then reuses those visual tokens, so follow-up questions cost only the language model. The
    first user turn carries the ``<image>`` placeholder and the history (questions and answers) accumulates in
    :attr:`conversation`. Without a video the session is a text-only chat.
    """

    def __init__(
        self,
        tokenizer: Any,
        model: Any,
        image_processor: Any,
        *,
        conv_mode: str = "qwen_1_5",
        settings: GenerationSettings | None = None,
        context_len: int | None = None,
    ) -> None:
        if conv_mode not in conv_templates:
            raise ValueError(f"conv_mode={conv_mode!r}: use one of {sorted(conv_templates)}")
        self.tokenizer = tokenizer
        self.model = model
        self.image_processor = image_processor
        self.conv_mode = conv_mode
        self.settings = settings or GenerationSettings()
        self.context_len = context_len
        self.video: VideoStats | None = None
        self.visual_tokens: Any = None  # SlowFastTokens of the loaded video
        self.reset()
        self._stop_string, self._stop_token_id = template_stop(conv_mode, tokenizer)

    # Shared, never copied: the weights and preprocessors (read-only, possibly tens of GB), and the video's tokens
    # (replaced by each load, never changed in place).
    _SHARED_ON_COPY = ("tokenizer", "model", "image_processor", "visual_tokens")

    def __deepcopy__(self, memo: dict[int, Any]) -> ChatSession:
        """An independent conversation on the same model: the history and settings are copied; the weights,
        tokenizer, image processor and the loaded video's tokens are shared (Gradio deep-copies session state)."""
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            setattr(copied, name, value if name in self._SHARED_ON_COPY else copy.deepcopy(value, memo))
        return copied

    @property
    def default_max_frames(self) -> int:
        """Frames the model was trained with (its config's ``video_frames``, else the reference trainer's
        ``mm_training_video_frames``), or 64 when the checkpoint does not say."""
        return trained_video_frames(self.model.config) or DEFAULT_MAX_FRAMES

    def frame_count_warning(self, max_frames: int) -> str | None:
        """Why ``max_frames`` frames per video may give worse answers than the trained count (None if it is
        the trained count, or the checkpoint does not record one)."""
        return frame_count_warning(max_frames, self.model.config)

    @property
    def turns(self) -> int:
        """Answered questions in the current conversation."""
        return self._turns

    def reset(self) -> None:
        """Start a new conversation; the loaded video (if any) is kept."""
        self.conversation = conv_templates[self.conv_mode].copy()
        self._turns = 0

    def load_video(
        self, path: str | os.PathLike[str], max_frames: int | None = None, fps: float | None = None
    ) -> VideoStats:
        """Decode ``path`` (see :func:`llava.video.load_video`), encode it, and start a new conversation about it.

        ``max_frames`` defaults to :attr:`default_max_frames`; ``fps`` samples at that rate instead of uniformly.
        """
        self._require_vision_tower()  # before the decoding, which would be wasted
        if max_frames is None:
            max_frames = self.default_max_frames
        start = time.perf_counter()
        clip = load_video(path, max_frames, fps=fps)
        return self.load_clip(clip, decode_s=time.perf_counter() - start)

    def load_clip(self, clip: VideoClip, decode_s: float = 0.0) -> VideoStats:
        """Encode already-decoded frames and start a new conversation about them: :meth:`load_video` minus the decoding.

        ``clip.frames`` is the ``uint8`` RGB array ``[T, H, W, 3]`` of :func:`llava.video.load_video`, e.g. frames
        shown to the user before they are encoded. ``decode_s`` is reported as the decoding time in the returned
        :class:`VideoStats`, whose ``path`` is ``clip.path``.
        """
        self._require_vision_tower()
        start = time.perf_counter()
        pixels = clip_pixels(clip, self.image_processor, self.model.config)
        with torch.no_grad():
            tokens = self.model.encode_images([pixels])[0]
        if tokens.fast.is_cuda:
            torch.cuda.synchronize(tokens.fast.device)
        encoded = time.perf_counter()

        self.visual_tokens = tokens
        frames, height, width = clip.frames.shape[:3]
        self.video = VideoStats(
            path=os.fspath(clip.path),
            frames=frames,
            height=height,
            width=width,
            backend=clip.backend,
            duration=clip.duration,
            decode_s=decode_s,
            encode_s=encoded - start,
            fast_tokens=tokens.fast.shape[0],
            slow_tokens=tokens.slow.shape[0],
        )
        self.reset()
        return self.video

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> AnswerStats:
        """Answer ``question`` in the context of the video and the earlier turns.

        ``on_text`` receives the answer piece by piece while it is generated. On an error (or Ctrl-C) the
        question is dropped from the history, so the session stays usable.
        """
        question = question.strip()
        if not question:
            raise ValueError("the question is empty")
        if self.visual_tokens is not None and self._turns == 0:
            question = f"{DEFAULT_IMAGE_TOKEN}\n{question}"
        conv = self.conversation
        conv.append_message(conv.roles[0], question)
        conv.append_message(conv.roles[1], None)
        try:
            answer = self._generate(conv.get_prompt(), on_text)
        except BaseException:
            del conv.messages[-2:]
            raise
        conv.messages[-1][1] = answer.text.strip()
        self._turns += 1
        return answer

    # -- internals -----------------------------------------------------------------------------------------
    def _require_vision_tower(self) -> None:
        if self.image_processor is None:
            raise ValueError("this checkpoint has no vision tower, so it cannot read a video")

    def _stopping_kwargs(self, stop_event: threading.Event) -> dict[str, Any]:
        criteria: list[StoppingCriteria] = [_StopOnEvent(stop_event)]
        kwargs: dict[str, Any] = {}
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if self._stop_token_id is not None:
            if self._stop_token_id not in eos_ids:
                eos_ids.append(self._stop_token_id)
        elif self._stop_string:
            # generate() driven by inputs_embeds hands the criteria only the new tokens: nothing to skip.
            criteria.append(KeywordsStoppingCriteria([self._stop_string], self.tokenizer, torch.empty(1, 0)))
        if eos_ids:
            kwargs["eos_token_id"] = eos_ids
        has_pad = getattr(self.model.generation_config, "pad_token_id", None) is not None
        if not has_pad and self.tokenizer.pad_token_id is not None:
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
        return kwargs

    def _generate(self, prompt: str, on_text: Callable[[str], None] | None) -> AnswerStats:
        input_ids = tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
        placeholders = int((input_ids == IMAGE_TOKEN_INDEX).sum())
        if placeholders and self.visual_tokens is None:
            raise ValueError(f"the prompt has {placeholders} <image> placeholder(s) but no video is loaded")
        visual = [self.visual_tokens] * placeholders if placeholders else None
        text_tokens = input_ids.shape[1] - placeholders
        fast = placeholders * self.visual_tokens.fast.shape[0] if placeholders else 0
        slow = placeholders * self.visual_tokens.slow.shape[0] if placeholders else 0
        if self.context_len and text_tokens + fast >= self.context_len:
            raise ValueError(
                f"the conversation is {text_tokens + fast} tokens long, beyond the model's context length "
                f"{self.context_len}: start a new conversation or use fewer frames"
            )

        streamer = _TimedStreamer(self.tokenizer)
        stop_event = threading.Event()
        kwargs = {**self.settings.generate_kwargs(), **self._stopping_kwargs(stop_event), "streamer": streamer}
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["ids"] = self.model.generate(input_ids.to(self.model.device), visual_tokens=visual, **kwargs)
            except BaseException as err:  # re-raised in the caller's thread
                result["error"] = err
                streamer.end()  # unblock the consumer

        thread = threading.Thread(target=run, name="llava-generate", daemon=True)
        start = time.perf_counter()
        thread.start()
        try:
            for piece in streamer:
                if piece and on_text is not None:
                    on_text(piece)
        except BaseException:
            stop_event.set()
            thread.join()
            raise
        thread.join()
        if "error" in result:
            raise result["error"]

        new_ids = result["ids"]
        if visual is None:  # plain generate() returns the prompt too
            new_ids = new_ids[:, input_ids.shape[1] :]
        token_ids = new_ids[0].tolist()
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if self._stop_token_id is None and self._stop_string and self._stop_string in text:
            text = text[: text.index(self._stop_string)]
        times = streamer.token_times
        first = times[0] if times else time.perf_counter()
        return AnswerStats(
            text=text,
            token_ids=token_ids,
            prompt=prompt,
            text_tokens=text_tokens,
            fast_tokens=fast,
            slow_tokens=slow,
            prefill_s=first - start,
            decode_s=times[-1] - first if times else 0.0,
        )


# --------------------------------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m llava.serve.cli`` (also installed as ``slowfast-cli``)."""
    parser = ArgumentParser(
        prog="python -m llava.serve.cli",
        description="Ask a Slow-Fast video LLM about a video; the answer is streamed to stdout.",
    )
    parser.add_argument("--model-path", required=True, help="checkpoint folder or hub id")
    parser.add_argument("--model-base", default=None, help="base checkpoint of a LoRA adapter checkpoint")
    parser.add_argument("--video", required=True, help="video file, image, or folder of frames")
    parser.add_argument("--question", default=None, help="the question (the first turn with --interactive)")
    parser.add_argument(
        "--max-frames", type=positive_int, default=None,
        help="most frames to sample (default: the checkpoint's trained count, video_frames or "
        "mm_training_video_frames, else 64; another count is warned about)",
    )
    parser.add_argument("--fps", type=positive_float, default=None, help="sample at this rate, capped at --max-frames")
    parser.add_argument("--conv-mode", default="qwen_1_5", choices=sorted(conv_templates), help="prompt template")
    parser.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-p", type=probability, default=None, help="nucleus sampling (with --temperature > 0)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=512)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument(
        "--cross-attn-decode-mode", default=None, choices=["attend", "reference"],
        help="whether generated tokens read the slow tokens (default: the checkpoint's setting)",
    )
    parser.add_argument("--use-flash-attn", action="store_true", help="use flash-attn 2 when installed (CUDA)")
    parser.add_argument(
        "--interactive", action="store_true",
        help="chat about the video: questions from stdin until EOF, 'exit' or 'quit'",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="report timings and token counts on stderr")
    return parser


def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)


def _print_piece(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@contextlib.contextmanager
def _native_stderr_silenced(enabled: bool) -> Iterator[None]:
    """Point file descriptor 2 at /dev/null: FFmpeg inside decord/PyAV logs straight to it, bypassing Python.

    The decoder's complaint still reaches the user through the ``VideoLoadError`` message.
    """
    fd = 2  # what C code writes to, whatever sys.stderr is
    saved = -1
    if enabled:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            saved = os.dup(fd)
    if saved < 0:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _report_video(verbose: bool, video: VideoStats) -> None:
    _log(verbose, f"video decoding: {video.decode_s:.3f} s ({video.frames} frames {video.width}x{video.height}, "
                  f"{video.duration:.2f} s of video, {video.backend})")
    _log(verbose, f"vision encoding: {video.encode_s:.3f} s")


def _report_answer(verbose: bool, answer: AnswerStats) -> None:
    _log(verbose, f"prefill: {answer.prefill_s:.3f} s (time to first token)")
    rate = answer.decode_tokens_per_s
    if rate is None:
        _log(verbose, f"decode: n/a ({answer.new_tokens} token(s) generated)")
    else:
        _log(verbose, f"decode: {rate:.1f} tokens/s ({answer.new_tokens - 1} tokens after the first "
                      f"in {answer.decode_s:.3f} s)")
    _log(verbose, f"tokens: fast {answer.fast_tokens}, slow {answer.slow_tokens}, text {answer.text_tokens}, "
                  f"generated {answer.new_tokens}")


def _answer(session: ChatSession, question: str, verbose: bool) -> None:
    answer = session.ask(question, on_text=_print_piece)
    print(flush=True)
    _report_answer(verbose, answer)


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, OSError, ValueError):
        return False


def _chat(session: ChatSession, first_question: str | None, verbose: bool) -> int:
    pending = first_question
    while True:
        if pending is not None:
            question, pending = pending, None
            print(f"{USER_PROMPT}{question}", flush=True)
        else:
            try:
                question = input(USER_PROMPT)
            except EOFError:
                print(flush=True)
                return 0
            if not _is_terminal(sys.stdin):  # no terminal echoed a piped question: keep the transcript readable
                print(question, flush=True)
        question = question.strip()
        if not question:
            continue
        if question.lower() in QUIT_WORDS:
            return 0
        print(ASSISTANT_PROMPT, end="", flush=True)
        try:
            _answer(session, question, verbose)
        except KeyboardInterrupt:  # stop this answer, keep chatting
            print(flush=True)


def _run(args: argparse.Namespace) -> int:
    verbose = args.verbose
    if not os.path.exists(args.video):  # fail before the slow model load
        raise VideoLoadError(args.video, "file does not exist")
    check_model_path(args.model_path)

    start = time.perf_counter()
    tokenizer, model, image_processor, context_len = load_pretrained_model(
        args.model_path,
        args.model_base,
        get_model_name_from_path(args.model_path),
        device=args.device,
        torch_dtype=None if args.dtype == "auto" else args.dtype,
        use_flash_attn=args.use_flash_attn,
        cross_attn_decode_mode=args.cross_attn_decode_mode,
    )
    _log(verbose, f"model loading: {time.perf_counter() - start:.3f} s ({model.device}, {model.dtype}, "
                  f"cross-attention decode mode {model.config.cross_attn_decode_mode})")
    session = ChatSession(
        tokenizer,
        model,
        image_processor,
        conv_mode=args.conv_mode,
        settings=GenerationSettings(args.temperature, args.top_p, args.max_new_tokens),
        context_len=context_len,
    )
    max_frames = args.max_frames or session.default_max_frames
    mismatch = session.frame_count_warning(max_frames)
    if mismatch:
        print(f"warning: {mismatch}", file=sys.stderr, flush=True)
    with _native_stderr_silenced(not verbose):
        video = session.load_video(args.video, max_frames, fps=args.fps)
    _report_video(verbose, video)

    if args.interactive:
        return _chat(session, args.question, verbose)
    _answer(session, args.question, verbose)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    try:
        args = build_parser().parse_args(argv)
        if args.question is not None and not args.question.strip():
            raise UsageError("argument --question: must not be empty")
        if args.question is None and not args.interactive:
            raise UsageError("the following argument is required without --interactive: --question")
    except UsageError as err:
        return fail(err)
    except SystemExit as done:  # --help
        return done.code if isinstance(done.code, int) else 0

    with quiet_libraries(args.verbose):
        try:
            return _run(args)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # e.g. piped into `head`: stop quietly
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps interpreter shutdown from flushing the pipe
            return 1
        except torch.cuda.OutOfMemoryError as err:
            if args.verbose:
                traceback.print_exc()
            return fail(f"out of GPU memory ({err}); try fewer --max-frames or --dtype bfloat16")
        except (ValueError, OSError) as err:  # CheckpointError and VideoLoadError are ValueErrors
            if args.verbose:
                traceback.print_exc()
            return fail(err)


if __name__ == "__main__":
    sys.exit(main())
