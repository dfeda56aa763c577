"""Batched generation behind the API server: one worker thread owns the model and decodes requests together.

Requests are queued as :class:`GenerationJob` objects. The worker takes every queued job (up to
``max_batch_size``, waiting while they keep arriving ``batch_window_s`` apart) into one batch, encodes the
batch's new videos in one vision pass, and runs one left-padded ``model.generate`` over all of them. Requests
that arrive while a batch is decoding join the next batch. Each row keeps its own sampling settings, stop
strings and token limit: rows are sampled by :class:`RowSampler` (a logits processor that turns each sampled
row into a one-hot choice, so the batch-wide greedy step picks it) and ended by :class:`RowTracker` (a stopping
criterion that also detokenizes each row's new token and hands the text to the job, with the token's
log-probabilities when the job asked, read by :class:`~llava.serve.logprobs.LogprobRecorder` from the same
step's scores). A cancelled job (its client went away) ends at the next step and frees its place in the queue.

A failing batch does not fail its neighbours: its jobs that have not produced a token yet run again one by one,
so only the job that fails alone gets the error. New videos go through the vision tower in chunks of at most
``vision_chunk_frames`` frames (a long video alone), so one long video does not take the memory of all.

Visual tokens are cached by content: :class:`~llava.serve.token_cache.TokenCache` maps ``(sha256 of the file, frames, fps, kind)`` to
the encoded :class:`~llava.model.slow_fast.SlowFastTokens`, least recently used first out, so a video sent
twice is decoded and encoded once.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from llava.mm_utils import template_stop
from llava.model.slow_fast import SlowFastTokens
from llava.serve.logprobs import LogprobRecorder, TokenText
from llava.serve.token_cache import TokenCache

__all__ = [
    "BatchingEngine",
    "EngineBusy",
    "EngineClosed",
    "EngineObserver",
    "Failed",
    "Finished",
    "GenerationJob",
    "RowSampler",
    "RowTracker",
    "SamplingParams",
    "TextDelta",
    "TokenCache",
    "VisualInput",
]

logger = logging.getLogger(__name__)

CANCELLED = "cancelled"
WINDOW_LIMIT = 10  # a batch waits for more jobs at most this many batch windows in all


# --------------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class SamplingParams:
    """How one request is sampled. ``temperature == 0`` is greedy; ``top_p == 1`` keeps every token.

    ``max_new_tokens`` counts every generated token, the end-of-turn token included (as ``generate`` does).
    ``stop`` strings end the answer where they first appear (they are not part of it). ``ignore_eos`` keeps the
    model from choosing an end-of-turn token, so the answer runs to ``max_new_tokens`` (for benchmarks).
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class VisualInput:
    """One video or image of a request: its cache key and token counts, and either its encoded ``tokens``
    (already cached) or its preprocessed ``pixels`` ``[T, 3, S, S]`` (encoded by the worker)."""

    key: Hashable
    fast_tokens: int
    slow_tokens: int
    tokens: SlowFastTokens | None = None
    pixels: torch.Tensor | None = None
    from_cache: bool = False


@dataclass
class TextDelta:
    """More of the answer's text, and the log-probability entries of the tokens that wrote it (when asked)."""

    text: str
    logprobs: list[dict[str, Any]] | None = None


@dataclass
class Finished:
    """The answer is complete: ``reason`` is ``"stop"``, ``"length"`` or ``"cancelled"``; ``text`` is all of it,
    ``logprobs`` the entries of all its tokens (when asked)."""

    reason: str
    completion_tokens: int
    text: str
    logprobs: list[dict[str, Any]] | None = None


@dataclass
class Failed:
    """Generation failed; ``error`` says why."""

    error: BaseException


Event = TextDelta | Finished | Failed


@dataclass(eq=False)
class GenerationJob:
    """One request for the worker: the prompt's ids ``[L]`` with one ``IMAGE_TOKEN_INDEX`` per entry of
    ``visuals`` (in order), the sampling settings, the cross-attention decode mode, and ``emit``, which receives
    the job's events (called from the worker thread; it must not block). ``logprobs``: ``None``, or how many
    alternatives each generated token's log-probability entry lists."""

    input_ids: torch.Tensor
    visuals: list[VisualInput]
    sampling: SamplingParams
    decode_mode: str
    emit: Callable[[Event], None]
    logprobs: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    emitted: bool = False  # some of its answer went out: it cannot be run again
    submitted_at: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Stop this job: dropped if still queued, ended at the next decoding step if running."""
        self.cancelled.set()


class EngineBusy(RuntimeError):
    """The queue is full."""


class EngineClosed(RuntimeError):
    """The engine is shutting down."""


class EngineObserver:
    """What the engine reports as it works (the server's metrics); every method does nothing here."""

    def batch_started(self, size: int) -> None:
        """A batch of ``size`` jobs starts (again for each job retried alone)."""

    def visuals_encoded(self, encoded: int, cache_hits: int) -> None:
        """A batch's visual inputs: ``encoded`` went through the vision tower, ``cache_hits`` were cached."""

    def job_finished(self, job: GenerationJob, event: Finished | Failed, seconds: float) -> None:
        """``job`` ended with ``event``, ``seconds`` after it was queued."""


# --------------------------------------------------------------------------------------------------- rows


class _Detokenizer:
    """Incremental decoding of one row's tokens into text.

    Decodes a short window of recent tokens and emits only what the newest token added, holding it back while
    it ends in an incomplete UTF-8 sequence (shown as U+FFFD), so the pieces add up to the whole answer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # tokens whose text has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (the end of the answer)."""
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        self._read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class _Row:
    """One job's progress inside a batch."""

    def __init__(self, job: GenerationJob, tokenizer: Any, eos_ids: frozenset[int], extra_stops: tuple[str, ...],
                 finish: Callable[[GenerationJob, Event], None]) -> None:
        self.job = job
        self.logprobs: list[dict[str, Any]] | None = None if job.logprobs is None else []  # sent with the text
        self._unsent: list[tuple[int, dict[str, Any]]] = []  # (where the token's text starts, its entry)
        self.eos_ids = frozenset() if job.sampling.ignore_eos else eos_ids
        self.stops = tuple(s for s in (*job.sampling.stop, *extra_stops) if s)
        self.detok = _Detokenizer(tokenizer)
        self.text = ""
        self.sent = 0  # characters of ``text`` handed to the job
        self.count = 0
        self.finished = False
        self._finish = finish

    def _send(self, end: int) -> None:
        if end > self.sent:
            entries = None
            if self.logprobs is not None:  # the tokens whose text starts before ``end``
                entries = [e for start, e in self._unsent if start < end]
                self._unsent = [(start, e) for start, e in self._unsent if start >= end]
                self.logprobs += entries
            self.job.emitted = True
            self.job.emit(TextDelta(self.text[self.sent : end], entries))
            self.sent = end

    def _stop_at(self) -> int:
        """Where the first stop string starts in the unsent text, or -1."""
        return min((i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0), default=-1)

    def _close(self, reason: str) -> None:
        self.finished = True
        self._finish(self.job, Finished(reason, self.count, self.text[: self.sent], self.logprobs))

    def end(self, reason: str) -> None:
        """Finish the row for ``reason``, sending the text still held back (unless it was cancelled)."""
        if self.finished:
            return
        if reason != CANCELLED:
            self.text += self.detok.flush()
            cut = self._stop_at()
            if cut >= 0:
                self.text, reason = self.text[:cut], "stop"
            self._send(len(self.text))
        self._close(reason)

    def step(self, token: int, entry: dict[str, Any] | None = None) -> None:
        """Take the row's newest token (and its log-probability ``entry``, when the job asked)."""
        if self.job.cancelled.is_set():
            self.end(CANCELLED)
            return
        self.count += 1
        if token in self.eos_ids:
            self.end("stop")
            return
        if entry is not None:
            self._unsent.append((len(self.text), entry))
        self.text += self.detok.add(token)
        cut = self._stop_at()
        if cut >= 0:
            self.text = self.text[:cut]
            self._send(cut)
            self._close("stop")
            return
        sent = self.sent
        self._send(len(self.text) - _held_back(self.text, self.stops))
        if self.count == 1 and self.sent == sent:  # the first token is news even when it shows no text yet
            self.job.emit(TextDelta("", [] if self.logprobs is not None else None))
        if self.count >= self.job.sampling.max_new_tokens:
            self.end("length")


class RowTracker(StoppingCriteria):
    """A stopping criterion over a batch of jobs: each step it takes every running row's new token, turns it
    into text for the row's job, and reports the rows that ended (end-of-turn token, stop string, token limit,
    or cancellation).

    ``generate`` driven by ``inputs_embeds`` hands it only the generated ids, so ``input_ids[:, -1]`` is the
    newest token of every row. ``recorder`` holds the step's log-probabilities for the rows that asked.
    """

    def __init__(self, jobs: list[GenerationJob], tokenizer: Any, eos_ids: list[int], extra_stops: tuple[str, ...],
                 finish: Callable[[GenerationJob, Event], None], recorder: LogprobRecorder | None = None,
                 token_text: TokenText | None = None) -> None:
        eos = frozenset(eos_ids)
        self.rows = [_Row(job, tokenizer, eos, extra_stops, finish) for job in jobs]
        self.recorder = recorder
        self.token_text = token_text

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        newest = input_ids[:, -1].tolist()
        for i, (row, token) in enumerate(zip(self.rows, newest)):
            if not row.finished:
                entry = None
                if self.recorder is not None and self.token_text is not None:
                    entry = self.recorder.entry(i, int(token), self.token_text)
                row.step(int(token), entry)
        return torch.tensor([row.finished for row in self.rows], dtype=torch.bool, device=input_ids.device)

    def end_all(self, reason: str) -> None:
        """End the rows still running (``generate`` returned without them being done)."""
        for row in self.rows:
            row.end(reason)


def _sample_row(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Draw one token id from ``logits`` ``[V]`` at ``temperature``, keeping the smallest set of most likely
    tokens whose probability reaches ``top_p``."""
    logits = logits / temperature
    if top_p < 1:
        ordered, order = logits.sort(descending=True)
        probs = ordered.softmax(-1)
        beyond = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, ordered.masked_fill(beyond, float("-inf")))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


class RowSampler(LogitsProcessor):
    """Per-row sampling inside a greedy ``generate``: each row with ``temperature > 0`` draws its token with its
    own generator (seeded by its ``seed``, so a seeded request gives the same answer whatever shares its batch)
    and its scores become one-hot on that token, which the batch's argmax then picks. Greedy rows are left as
    they are. Rows with ``ignore_eos`` never get an end-of-turn token."""

    def __init__(self, params: list[SamplingParams], eos_ids: list[int]) -> None:
        self.params = params
        self.eos_ids = list(eos_ids)
        self.suppress = [i for i, p in enumerate(params) if p.ignore_eos]
        self._generators: dict[int, torch.Generator] = {}

    def _generator(self, row: int, device: torch.device) -> torch.Generator:
        generator = self._generators.get(row)
        if generator is None:
            seed = self.params[row].seed
            generator = torch.Generator(device=device)
            generator.manual_seed(secrets.randbits(63) if seed is None else seed % 2**63)
            self._generators[row] = generator
        return generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.suppress and self.eos_ids:
            rows = torch.tensor(self.suppress, device=scores.device)
            eos = torch.tensor(self.eos_ids, device=scores.device)
            scores[rows[:, None], eos[None, :]] = float("-inf")
        for row, p in enumerate(self.params):
            if p.temperature > 0:
                token = _sample_row(scores[row], p.temperature, p.top_p, self._generator(row, scores.device))
                scores[row] = float("-inf")
                scores[row, token] = 0.0
        return scores


# --------------------------------------------------------------------------------------------------- engine


class BatchingEngine:
    """Owns ``model`` on one worker thread and answers :class:`GenerationJob` objects in batches.

    ``max_batch_size`` bounds the rows of one ``generate``. Before starting a batch that is not full, the worker
    waits until no job has arrived for ``batch_window_s`` (at most ten windows in all), so a burst of requests
    shares one batch while a lone request waits one window. ``max_pending`` bounds the jobs queued or running (beyond it
    :meth:`submit` raises :class:`EngineBusy`); ``cache_size`` is the number of encoded videos kept;
    ``vision_chunk_frames`` the most frames of new videos sent through the vision tower at once (a longer video
    goes alone). :attr:`stats` counts batches, requests, encoded and cached videos, cancellations, failures and
    jobs retried alone; ``observer`` hears of batches, encoded videos and finished jobs.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        conv_mode: str = "qwen_1_5",
        max_batch_size: int = 8,
        batch_window_s: float = 0.005,
        max_pending: int = 256,
        cache_size: int = 32,
        vision_chunk_frames: int = 64,
        observer: EngineObserver | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be positive, got {max_pending}")
        if batch_window_s < 0:
            raise ValueError(f"batch_window_s must be >= 0, got {batch_window_s}")
        if vision_chunk_frames < 1:
            raise ValueError(f"vision_chunk_frames must be positive, got {vision_chunk_frames}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s
        self.max_pending = max_pending
        self.cache = TokenCache(cache_size)
        self.vision_chunk_frames = vision_chunk_frames
        self.observer = observer or EngineObserver()
        self.token_text = TokenText(tokenizer)
        self.default_decode_mode: str = getattr(model.config, "cross_attn_decode_mode", "attend")
        stop_string, stop_id = template_stop(conv_mode, tokenizer)
        eos = getattr(model.generation_config, "eos_token_id", None)
        self.eos_ids: list[int] = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if stop_id is not None and stop_id not in self.eos_ids:
            self.eos_ids.append(stop_id)
        # a template whose end-of-turn marker is several tokens is stopped on its text instead
        self.extra_stops: tuple[str, ...] = (stop_string,) if stop_id is None and stop_string else ()
        pad = getattr(model.generation_config, "pad_token_id", None)
        self.pad_id: int = pad if pad is not None else (tokenizer.pad_token_id or 0)
        self.stats: dict[str, int] = dict.fromkeys(
            ("requests", "completed", "cancelled", "failed", "batches", "largest_batch", "videos_encoded",
             "video_cache_hits", "retried_alone"), 0,
        )
        self._pending: deque[GenerationJob] = deque()
        self._running: list[GenerationJob] = []
        self._open = 0  # jobs queued or running
        self._cond = threading.Condition()
        self._closing = False
        self._last_arrival = 0.0
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        with self._cond:
            if self._thread is not None:
                return
            self._closing = False
            self._thread = threading.Thread(target=self._loop, name="llava-api-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every job and stop the worker; waits at most ``timeout`` seconds for the running batch."""
        with self._cond:
            self._closing = True
            for job in [*self._pending, *self._running]:
                job.cancel()
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    @property
    def open_jobs(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return self._open

    def running(self) -> list[GenerationJob]:
        """The jobs of the batch being decoded now (a snapshot)."""
        with self._cond:
            return list(self._running)

    def submit(self, job: GenerationJob) -> None:
        """Queue ``job``; raises :class:`EngineBusy` when ``max_pending`` jobs are open, :class:`EngineClosed`
        while shutting down."""
        with self._cond:
            if self._closing or self._thread is None:
                raise EngineClosed("the server is shutting down")
            if self._open >= self.max_pending:
                raise EngineBusy(f"{self._open} requests are already queued or running (the limit is "
                                 f"{self.max_pending}): retry later")
            self._open += 1
            self.stats["requests"] += 1
            self._pending.append(job)
            self._last_arrival = time.monotonic()
            self._cond.notify_all()

    # -- worker -------------------------------------------------------------------------------------------
    def _finish(self, job: GenerationJob, event: Event) -> None:
        if job.done:
            return
        job.done = True
        key = "failed" if isinstance(event, Failed) else CANCELLED if event.reason == CANCELLED else "completed"
        with self._cond:
            self._open -= 1
            self.stats[key] += 1
        try:
            self.observer.job_finished(job, event, time.perf_counter() - job.submitted_at)
        except Exception:  # metrics must never stop the worker
            logger.debug("the observer failed", exc_info=True)
        try:
            job.emit(event)
        except Exception:  # a consumer that went away must not stop the worker
            logger.debug("could not deliver the end of a job", exc_info=True)

    def _next_batch(self) -> list[GenerationJob] | None:
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            give_up = time.monotonic() + WINDOW_LIMIT * self.batch_window_s
            while len(self._pending) < self.max_batch_size and not self._closing:
                left = min(self._last_arrival + self.batch_window_s, give_up) - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[GenerationJob] = []
            later: deque[GenerationJob] = deque()
            dropped: list[GenerationJob] = []
            while self._pending:
                job = self._pending.popleft()
                if job.cancelled.is_set():
                    dropped.append(job)
                elif len(batch) < self.max_batch_size and (not batch or job.decode_mode == batch[0].decode_mode):
                    batch.append(job)
                else:
                    later.append(job)
            self._pending = later
            self._running = batch
        for job in dropped:
            self._finish(job, Finished(CANCELLED, 0, ""))
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            if not batch:
                continue
            try:
                self._run_isolated(batch)
            finally:
                with self._cond:
                    self._running = []
        with self._cond:
            leftover, self._pending = list(self._pending), deque()
        for job in leftover:
            self._finish(job, Finished(CANCELLED, 0, ""))

    def _run_isolated(self, batch: list[GenerationJob]) -> None:
        """Run ``batch``; if it fails, run its jobs that have sent nothing yet one by one, so that only a job that
        also fails alone gets the error (a job that already streamed part of its answer gets it too)."""
        try:
            self._run(batch)
            return
        except Exception as err:
            if len(batch) == 1:
                self._fail(batch[0], err)
                return
            logger.info("a batch of %d requests failed (%s: %s); running them one by one", len(batch),
                        type(err).__name__, err)
            first_error = err
        for job in batch:
            if job.done:
                continue
            if job.emitted:
                self._fail(job, first_error)
                continue
            self.stats["retried_alone"] += 1
            try:
                self._run([job])
            except Exception as err:
                self._fail(job, err)

    def _fail(self, job: GenerationJob, err: BaseException) -> None:
        if not job.done:
            self._finish(job, Failed(err))

    def _encode(self, batch: list[GenerationJob]) -> None:
        """Give every visual input of ``batch`` its tokens: from the cache, or one vision pass over the new ones."""
        missing: OrderedDict[Hashable, list[VisualInput]] = OrderedDict()
        hits = 0
        for job in batch:
            for visual in job.visuals:
                if visual.tokens is not None:  # found in the cache when the request was read
                    hits += visual.from_cache
                    continue
                cached = self.cache.get(visual.key)
                if cached is not None:
                    visual.tokens, visual.from_cache, visual.pixels = cached, True, None
                    hits += 1
                else:
                    missing.setdefault(visual.key, []).append(visual)
        groups = list(missing.values())
        if any(group[0].pixels is None for group in groups):
            raise ValueError("a visual input has neither tokens nor pixels")
        for chunk in self._vision_chunks(groups):
            with torch.no_grad():
                encoded = self.model.encode_images([group[0].pixels for group in chunk])
            for group, tokens in zip(chunk, encoded):
                self.cache.put(group[0].key, tokens)
                for i, visual in enumerate(group):
                    visual.tokens, visual.pixels = tokens, None
                    if i:  # the same video twice in one batch: encoded once
                        visual.from_cache = True
                        hits += 1
        self.stats["videos_encoded"] += len(groups)
        self.stats["video_cache_hits"] += hits
        self.observer.visuals_encoded(len(groups), hits)

    def _vision_chunks(self, groups: list[list[VisualInput]]) -> list[list[list[VisualInput]]]:
        """``groups`` (one per distinct video) in runs of at most ``vision_chunk_frames`` frames; a video with
        more frames than that forms a run of its own."""
        chunks: list[list[list[VisualInput]]] = []
        frames = 0
        for group in groups:
            count = int(group[0].pixels.shape[0]) if group[0].pixels.dim() == 4 else 1
            if not chunks or frames + count > self.vision_chunk_frames:
                chunks.append([])
                frames = 0
            chunks[-1].append(group)
            frames += count
        return chunks

    def _run(self, batch: list[GenerationJob]) -> None:
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
        self.observer.batch_started(len(batch))
        self._encode(batch)
        device = self.model.device
        length = max(job.input_ids.shape[0] for job in batch)
        input_ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, job in enumerate(batch):  # left padding, as generate() pads the merged sequences
            n = job.input_ids.shape[0]
            input_ids[row, length - n :] = job.input_ids
            attention_mask[row, length - n :] = 1
        visual = [v.tokens for job in batch for v in job.visuals]
        recorder = LogprobRecorder([job.logprobs for job in batch])
        tracker = RowTracker(batch, self.tokenizer, self.eos_ids, self.extra_stops, self._finish,
                             recorder if recorder.active else None, self.token_text)
        sampler = RowSampler([job.sampling for job in batch], self.eos_ids)
        kwargs: dict[str, Any] = dict(
            attention_mask=attention_mask.to(device),
            visual_tokens=visual,
            do_sample=False,
            max_new_tokens=max(job.sampling.max_new_tokens for job in batch),
            pad_token_id=self.pad_id,
            # the recorder first: log-probabilities of the model's scores, before the sampler changes them
            logits_processor=LogitsProcessorList([recorder, sampler] if recorder.active else [sampler]),
            stopping_criteria=StoppingCriteriaList([tracker]),
        )
        if self.eos_ids:
            kwargs["eos_token_id"] = self.eos_ids
        config = self.model.config
        previous = config.cross_attn_decode_mode
        config.cross_attn_decode_mode = batch[0].decode_mode
        try:
            self.model.generate(input_ids.to(device), **kwargs)
        finally:
            config.cross_attn_decode_mode = previous
        tracker.end_all("length")
