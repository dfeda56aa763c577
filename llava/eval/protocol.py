"""The evaluation protocols and per-request generation settings of the lmms-eval model ``slowfast_videomllm``.

A protocol fixes the settings that differ between this project's evaluation and the reference wrapper's
(decoder, frame sampling, dtype, image preprocessing, decode mode, generation settings): ``default`` or
``reference`` (:data:`PROTOCOLS`, :func:`resolve_protocol`). :func:`reference_frame_indices` picks the frames the
reference decoded; :class:`RequestSettings` parses one request's ``generation_kwargs``. Nothing here needs
lmms-eval, so these rules are importable and testable without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MODEL_ID = "slowfast_videomllm"
DEFAULT_NUM_FRAMES = 64
DEFAULT_MAX_NEW_TOKENS = 1024
VIDEO_BACKENDS = ("decord", "pyav", "auto")
DECODE_MODES = ("attend", "reference")
IMAGE_ASPECT_RATIOS = ("config", "pad", "crop")
GENERATION_MODES = ("task", "reference")
# The reference wrapper read its generation settings with getattr on the task's dict, so every task ran
# with its fallbacks: greedy, one beam, 256 new tokens, no stop strings.
REFERENCE_MAX_NEW_TOKENS = 256
# Generation settings passed on to ``generate`` as they are, beside the ones handled explicitly.
PASSTHROUGH_GEN_KWARGS = ("top_k", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "min_new_tokens")
HANDLED_GEN_KWARGS = ("max_new_tokens", "temperature", "top_p", "num_beams", "do_sample", "until")

# Settings a protocol fixes unless the model arguments name them. ``default`` is this plugin's choice where
# it differs from the reference; ``reference`` is the reference wrapper's behaviour, which produced the
# published numbers (docs/evaluation.md, "Evaluation protocols").
PROTOCOLS: dict[str, dict[str, Any]] = {
    "default": {
        "video_decode_backend": "decord",
        "fps": None,  # num_frames spread uniformly over the whole video
        "dtype": "auto",  # bf16 on CUDA
        "image_aspect_ratio": "config",  # the checkpoint's (released: pad to a square, as in training)
        "cross_attn_decode_mode": "attend",
        "generation": "task",
    },
    "reference": {
        "video_decode_backend": "pyav",
        "fps": 2.0,  # at most num_frames, picked exactly as the reference wrapper does
        "dtype": "float16",
        "image_aspect_ratio": "crop",  # the image processor alone: short side resized, centre crop
        "cross_attn_decode_mode": "reference",
        "generation": "reference",
    },
}


def resolve_protocol(protocol: str, **given: Any) -> dict[str, Any]:
    """The settings of ``protocol`` with each argument of ``given`` that is not None in place of the preset's.

    ``given`` takes the keys of :data:`PROTOCOLS` entries, as the model arguments spell them (``fps="none"``
    is an explicit "no fps": uniform sampling).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"{MODEL_ID}: model argument protocol={protocol!r}: use one of {', '.join(PROTOCOLS)}")
    unknown = set(given) - set(PROTOCOLS[protocol])
    if unknown:
        raise ValueError(f"{MODEL_ID}: protocol settings have no {', '.join(sorted(unknown))}")
    return {key: given[key] if given.get(key) is not None else value for key, value in PROTOCOLS[protocol].items()}


def reference_frame_indices(total_frames: int, video_fps: float, target_fps: float, num_frames: int) -> list[int]:
    """Indices of the frames the reference wrapper decodes from a video (its PyAV path at ``target_fps``).

    Candidates are every ``max(round(video_fps / target_fps), 1)``-th frame from frame 0. With fewer than
    ``num_frames`` candidates all of them are kept (a clip shorter than ``num_frames / target_fps`` seconds
    gets fewer frames); otherwise, with ``L`` candidates and ``r = L / num_frames`` (computed first, as there:
    the order of the float operations decides ties), the ``round((i + 1) * r - 1)``-th for ``i < num_frames``.
    ``round`` is Python's, halves to even.
    """
    if total_frames < 1 or not video_fps > 0 or not target_fps > 0 or num_frames < 1:
        raise ValueError(
            f"reference_frame_indices needs positive arguments, got total_frames={total_frames}, "
            f"video_fps={video_fps}, target_fps={target_fps}, num_frames={num_frames}"
        )
    step = max(round(video_fps / target_fps), 1)
    candidates = range(0, total_frames, step)
    if len(candidates) < num_frames:
        return list(candidates)
    ratio = len(candidates) / num_frames
    return [candidates[round((i + 1) * ratio - 1)] for i in range(num_frames)]


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
