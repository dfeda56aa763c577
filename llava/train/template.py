"""The ``qwen_1_5`` chat template of training: where the ``<image>`` marker goes, the ChatML prompt, its labels,
the cut that keeps a sample within the language model's budget, and the exact prompt length without building it.

:func:`preprocess_qwen` (one sample, ids and labels) and :func:`count_prompt_ids` (many samples, counts only)
render the turns with the same function, so the lengths the sampler plans with are the lengths the dataset makes.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import tokenizer_image_token

from .annotations import ROLE_NAMES, conversation_problem

__all__ = [
    "DEFAULT_SYSTEM_MESSAGE",
    "ChatMLIds",
    "SampleError",
    "count_prompt_ids",
    "normalize_image_markers",
    "preprocess_qwen",
    "render_turns",
    "truncate_to_budget",
]

DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

_MARKER_WITH_NEWLINES = re.compile(r"\n*" + re.escape(DEFAULT_IMAGE_TOKEN) + r"\n*")


def _remove_markers(value: str) -> str:
    """Drop every ``<image>`` marker with the newlines around it, then strip the ends.

    A marker that stood on its own line between two pieces of text leaves one newline behind.
    """
    return _MARKER_WITH_NEWLINES.sub(lambda m: "\n" if "\n" in m.group() else "", value).strip()


def normalize_image_markers(conversations: Sequence[Mapping[str, str]], has_visual: bool) -> list[dict[str, str]]:
    """Return a copy of ``conversations`` with the ``<image>`` marker where the model expects it.

    With ``has_visual`` the turn holding the marker becomes ``"<image>\\n" + rest`` (the marker and its
    surrounding newlines removed from where it stood); if no turn has one, the first human turn gets it.
    Without ``has_visual`` every marker is removed.

    Raises:
        ValueError: with ``has_visual``, more than one marker, or no human turn to put it in.
    """
    turns = [dict(turn) for turn in conversations]
    marked = [k for k, turn in enumerate(turns) if DEFAULT_IMAGE_TOKEN in turn["value"]]
    if not has_visual:
        for k in marked:
            turns[k]["value"] = _remove_markers(turns[k]["value"])
        return turns

    count = sum(turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in turns)
    if count > 1:
        raise ValueError(
            f"the conversation has {count} {DEFAULT_IMAGE_TOKEN} markers; a sample carries one visual input"
        )
    if marked:
        target = marked[0]
    else:
        humans = [k for k, turn in enumerate(turns) if turn["from"] == "human"]
        if not humans:
            raise ValueError(f"the conversation has no human turn to hold the {DEFAULT_IMAGE_TOKEN} marker")
        target = humans[0]
    turns[target]["value"] = f"{DEFAULT_IMAGE_TOKEN}\n{_remove_markers(turns[target]['value'])}"
    return turns


def with_time_instruction(conversations: Sequence[Mapping[str, str]], info: str) -> list[dict[str, str]]:
    """Insert ``info`` at the start of the first human turn, just after its leading ``<image>\\n``."""
    turns = normalize_image_markers(conversations, has_visual=True)
    first = next(k for k, turn in enumerate(turns) if turn["from"] == "human")
    value = turns[first]["value"]
    head = f"{DEFAULT_IMAGE_TOKEN}\n"
    if value.startswith(head):
        rest = value[len(head) :]
        turns[first]["value"] = f"{head}{info}\n{rest}" if rest else f"{head}{info}"
    else:
        turns[first]["value"] = f"{info}\n{value}"
    return turns


@dataclass(frozen=True)
class ChatMLIds:
    """Ids of the ChatML structure tokens of one tokenizer."""

    im_start: int
    im_end: int
    newline: int
    bos_prefix: tuple[int, ...]  # what tokenizer_image_token puts before every encoding (empty for Qwen2)

    @property
    def structural(self) -> frozenset[int]:
        return frozenset((self.im_start, self.im_end, self.newline))

    @classmethod
    def of(cls, tokenizer: Any) -> "ChatMLIds":
        ids = {}
        for name, text in (("im_start", IM_START), ("im_end", IM_END), ("newline", "\n")):
            encoded = tokenizer(text, add_special_tokens=False).input_ids
            if len(encoded) != 1:
                raise ValueError(
                    f"the tokenizer encodes {text!r} as {len(encoded)} tokens {encoded}; the qwen_1_5 template "
                    "needs a Qwen2 (ChatML) tokenizer where it is a single token"
                )
            ids[name] = encoded[0]
        return cls(bos_prefix=tuple(tokenizer_image_token("", tokenizer)), **ids)

    def encode(self, text: str, tokenizer: Any) -> list[int]:
        """Token ids of ``text`` (``<image>`` as ``-200``), without the tokenizer's BOS."""
        return tokenizer_image_token(text, tokenizer)[len(self.bos_prefix) :]


def render_turns(
    conversations: Sequence[Mapping[str, str]], has_visual: bool, system_message: str = DEFAULT_SYSTEM_MESSAGE
) -> list[tuple[str, str]]:
    """``(role, text)`` of every turn of the ``qwen_1_5`` prompt, the system turn first: ``text`` is
    ``<|im_start|>{role}\\n{value}<|im_end|>\\n`` with the ``<image>`` marker placed by
    :func:`normalize_image_markers`; a leading ``system`` turn replaces ``system_message``."""
    turns = normalize_image_markers(conversations, has_visual)
    if turns[0]["from"] == "system":
        system_message = turns[0]["value"]
        turns = turns[1:]
    contents = [("system", system_message)] + [(ROLE_NAMES[t["from"]], t["value"]) for t in turns]
    return [(role, f"{IM_START}{role}\n{content}{IM_END}\n") for role, content in contents]


def count_prompt_ids(
    conversations: Iterable[Sequence[Mapping[str, str]]],
    has_visual: Sequence[bool],
    tokenizer: Any,
    time_instruction: str | None = None,
) -> list[int]:
    """How many ids :func:`preprocess_qwen` makes of each conversation (``<image>`` counts as its one id), from
    one batched call of the tokenizer over the text between markers; only the counts are kept.

    ``time_instruction``: put this text where ``add_time_instruction`` puts a video's duration, in the samples
    with ``has_visual`` (the real text depends on the video; pass a stand-in of the same form).
    """
    pieces: list[str] = []
    owners: list[int] = []
    counts: list[int] = []
    for k, (conversation, visual) in enumerate(zip(conversations, has_visual, strict=True)):
        if visual and time_instruction is not None:
            conversation = with_time_instruction(conversation, time_instruction)
        markers = 0
        for _, text in render_turns(conversation, visual):
            parts = text.split(DEFAULT_IMAGE_TOKEN)
            markers += len(parts) - 1
            for part in parts:
                if part:
                    pieces.append(part)
                    owners.append(k)
        counts.append(markers)
    for owner, count in zip(owners, _token_counts(pieces, tokenizer), strict=True):
        counts[owner] += count
    return counts


def _token_counts(pieces: list[str], tokenizer: Any) -> list[int]:
    """Token counts of ``pieces`` without special tokens: one batched call of a fast tokenizer's Rust backend
    (without offsets when it can), else the tokenizer's own call."""
    if not pieces:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        return [len(encoding) for encoding in encode(pieces, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(pieces, add_special_tokens=False, return_attention_mask=False)["input_ids"]]


def preprocess_qwen(
    conversations: Sequence[Mapping[str, str]],
    tokenizer: Any,
    has_visual: bool,
    system_message: str = DEFAULT_SYSTEM_MESSAGE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render a conversation with the ``qwen_1_5`` template, tokenise it and build its labels.

    The prompt is ``<|im_start|>system\\n{system}<|im_end|>\\n`` followed by
    ``<|im_start|>{user|assistant}\\n{value}<|im_end|>\\n`` for each turn (:func:`render_turns`); a leading
    ``system`` turn replaces ``system_message``. ``<image>`` markers are first placed by
    :func:`normalize_image_markers` and become the single id ``-200``.

    Each turn is tokenised on its own. Since every turn starts with the special token ``<|im_start|>``,
    which the tokenizer never merges with its neighbours, the concatenation equals the tokenisation of
    the whole prompt.

    Labels: in system and user turns only ``<|im_start|>``, ``<|im_end|>`` and ``\\n`` tokens are
    supervised; in assistant turns every token is, except the role name; ``-200`` never is.

    Returns:
        ``input_ids`` and ``labels``, both ``torch.long`` ``[L]``.

    Raises:
        ValueError: malformed conversation, misplaced markers, or a tokenizer without ChatML tokens.
    """
    problem = conversation_problem(list(conversations))
    if problem:
        raise ValueError(f"invalid conversation: {problem}")
    ids = ChatMLIds.of(tokenizer)

    input_ids: list[int] = []
    labels: list[int] = []
    for role, text in render_turns(conversations, has_visual, system_message):
        turn_ids = ids.encode(text, tokenizer)
        if role == "assistant":
            header = ids.encode(f"{IM_START}{role}", tokenizer)
            if turn_ids[: len(header)] != header:
                raise ValueError(f"the tokenizer merges the role name {role!r} with the text after it")
            turn_labels = list(turn_ids)
            turn_labels[1 : len(header)] = [IGNORE_INDEX] * (len(header) - 1)
        else:
            turn_labels = [t if t in ids.structural else IGNORE_INDEX for t in turn_ids]
        input_ids += turn_ids
        labels += turn_labels

    labels = [IGNORE_INDEX if t == IMAGE_TOKEN_INDEX else label for t, label in zip(input_ids, labels)]
    return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------------


class SampleError(ValueError):
    """One sample cannot be used for training (it is skipped and replaced by another)."""


def truncate_to_budget(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    max_length: int,
    num_fast_tokens: int,
    *,
    structural_token_ids: Collection[int] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut text from the end so that the language model sees at most ``max_length`` positions.

    Each ``-200`` placeholder in ``input_ids`` ``[L]`` becomes ``num_fast_tokens`` positions, so a visual
    sample takes ``L - 1 + num_fast_tokens`` positions; a text-only sample takes ``L``.

    Args:
        input_ids, labels: ``[L]`` tensors of one sample.
        max_length: the language model's budget of positions.
        num_fast_tokens: fast tokens replacing each placeholder.
        structural_token_ids: ids that do not count as supervision when checking that something is left
            to learn (pass the ChatML ``<|im_start|>``, ``<|im_end|>`` and ``\\n`` ids, which are
            supervised everywhere, to require that some of the answer survives).

    Returns:
        ``(input_ids, labels)``, unchanged if they fit, else their first ``n`` entries.

    Raises:
        SampleError: the budget cannot hold everything up to and including the last placeholder, or no
            supervised label is left after the cut.
        ValueError: bad arguments.
    """
    if input_ids.dim() != 1 or labels.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and labels must be 1-D of equal length, got {tuple(input_ids.shape)} and {tuple(labels.shape)}"
        )
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if num_fast_tokens < 0:
        raise ValueError(f"num_fast_tokens must be >= 0, got {num_fast_tokens}")

    placeholders = (input_ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
    extra = len(placeholders) * (num_fast_tokens - 1)
    needed = len(input_ids) + extra
    if needed <= max_length:
        return input_ids, labels

    keep = max_length - extra
    if len(placeholders) and keep < int(placeholders[-1]) + 1:
        raise SampleError(
            f"the sample needs {needed} positions ({len(input_ids)} text ids with {len(placeholders)} visual "
            f"placeholder(s) of {num_fast_tokens} fast tokens) but max_length is {max_length}, which cannot "
            f"hold the text up to the visual placeholder at position {int(placeholders[-1])}"
        )
    input_ids, labels = input_ids[:keep], labels[:keep]
    supervised = labels != IGNORE_INDEX
    if structural_token_ids:
        supervised &= ~torch.isin(labels, torch.tensor(sorted(structural_token_ids), dtype=labels.dtype))
    if not bool(supervised.any()):
        raise SampleError(
            f"the sample needs {needed} positions but max_length is {max_length}; after cutting it to "
            f"{keep} ids no supervised label is left"
        )
    return input_ids, labels

