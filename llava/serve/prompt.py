"""Prompt building for the API server: chat messages to the template's prompt, and its length, bounded.

:func:`build_prompt` turns OpenAI-style messages into the conversation template's prompt with one ``<image>``
placeholder per video or image part; :func:`check_text_size` refuses a prompt by its characters before any
tokenizing, and :func:`bounded_token_count` counts tokens incrementally, stopping as soon as the prompt
certainly cannot fit, so a huge text costs about as much as the longest prompt that fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import conv_templates
from llava.serve.protocol import ApiError, Message

__all__ = [
    "MediaRef", "bounded_token_count", "build_prompt", "check_text_size", "longest_token_chars", "message_chars",
]

# Tokens of a prefix's tail that its cut may have split differently from the whole text.
_TAIL_CHARS = 1024
_FIRST_PREFIX_CHARS = 16384


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


def message_chars(messages: list[Message]) -> int:
    """Characters of text in ``messages`` (strings and text parts; media parts count nothing)."""
    total = 0
    for message in messages:
        content = message.content
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p["text"]) for p in content
                         if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
    return total


def check_text_size(messages: list[Message], max_chars: int | None) -> None:
    """Refuse (400, ``context_length_exceeded``) messages whose text is over ``max_chars`` characters; no
    tokenizing."""
    if max_chars is None:
        return
    chars = message_chars(messages)
    if chars > max_chars:
        raise ApiError(
            400, f"the messages hold {chars:,} characters of text, over this server's limit of {max_chars:,} "
                 "(the most a prompt that fits the model's context can have): send a shorter conversation",
            "messages", "context_length_exceeded",
        )


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` stands for (its longest vocabulary entry; a byte-level
    entry is at least as long as its text). A text of ``n`` characters has at least ``n / this`` tokens."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1) or 1


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def bounded_token_count(text: str, tokenizer: Any, limit: int, longest_token: int) -> int | None:
    """The number of tokens of ``text``, or ``None`` once it is certain to be over ``limit``.

    Certain by arithmetic when ``text`` has more than ``(limit + 1) * longest_token`` characters; otherwise
    prefixes four times longer each are tokenized, and a prefix whose tokens, less those of its last 1,024
    characters (where the cut may have split a word differently), are over ``limit`` ends the count. Only a
    text that may fit is tokenized whole.
    """
    if len(text) > (limit + 1) * longest_token:
        return None
    size = _FIRST_PREFIX_CHARS
    while size < len(text):
        prefix = text[:size]
        if _count(tokenizer, prefix) - _count(tokenizer, prefix[-_TAIL_CHARS:]) > limit:
            return None
        size *= 4
    return _count(tokenizer, text)
