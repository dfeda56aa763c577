"""Chat prompt templates.

A :class:`Conversation` holds a system prompt and an ordered list of ``[role, message]`` turns and
renders them into the single prompt string that the language model is trained on / generates from.
A ``None`` message marks the turn the model is expected to fill (usually the last assistant turn).
"""

from __future__ import annotations

import dataclasses
from enum import Enum, auto
from typing import Any


class SeparatorStyle(Enum):
    """How turns are delimited when a conversation is rendered."""

    SINGLE = auto()  # "role: text<sep>" for every turn
    TWO = auto()  # like SINGLE, separators alternate between `sep` (user) and `sep2` (assistant)
    MPT = auto()  # "role text<sep>" with the role already carrying its markup
    PLAIN = auto()  # bare messages, no roles (used for projector pre-training)
    LLAMA_2 = auto()  # "[INST] ... [/INST] answer </s>"
    CHATML = auto()  # "<|im_start|>role\ntext<|im_end|>\n" (Qwen)


Message = str | tuple | None


def _text_of(message: Message) -> str | None:
    """Return the text part of a message; image-carrying messages are ``(text, image, mode)``."""
    if isinstance(message, tuple):
        return message[0]
    return message


@dataclasses.dataclass
class Conversation:
    """A multi-turn conversation plus the template that renders it."""

    system: str
    roles: tuple[str, str]
    messages: list[list[Any]]
    offset: int
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"

    def get_prompt(self) -> str:
        """Render the system prompt and all turns into one prompt string."""
        turns = [(role, _text_of(message)) for role, message in self.messages]
        style = self.sep_style

        if style == SeparatorStyle.SINGLE:
            out = self.system + self.sep
            for role, text in turns:
                out += f"{role}: {text}{self.sep}" if text else f"{role}:"
            return out

        if style == SeparatorStyle.TWO:
            seps = (self.sep, self.sep2 if self.sep2 is not None else self.sep)
            out = self.system + seps[0]
            for i, (role, text) in enumerate(turns):
                out += f"{role}: {text}{seps[i % 2]}" if text else f"{role}:"
            return out

        if style == SeparatorStyle.MPT:
            out = self.system + self.sep
            for role, text in turns:
                out += f"{role}{text}{self.sep}" if text else role
            return out

        if style == SeparatorStyle.PLAIN:
            seps = (self.sep, self.sep2 if self.sep2 is not None else self.sep)
            out = self.system
            for i, (_, text) in enumerate(turns):
                if text:
                    out += text + seps[i % 2]
            return out

        if style == SeparatorStyle.LLAMA_2:
            sep2 = self.sep2 if self.sep2 is not None else ""
            out = ""
            for i, (_, text) in enumerate(turns):
                if not text:
                    continue
                if i % 2 == 0:
                    if i == 0 and self.system:
                        text = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{text}"
                    out += f"{self.sep}[INST] {text.strip()} [/INST]"
                else:
                    out += f" {text.strip()} {sep2}"
            # The BOS-like `sep` is added by the tokenizer, not by the prompt, for the first turn.
            return out.removeprefix(self.sep)

        if style == SeparatorStyle.CHATML:
            out = f"<|im_start|>system\n{self.system}{self.sep}\n" if self.system else ""
            for role, text in turns:
                out += f"{role}\n{text}{self.sep}\n" if text else f"{role}\n"
            return out

        raise ValueError(f"Unsupported separator style: {style}")

    def append_message(self, role: str, message: Message) -> None:
        """Add a turn; pass ``None`` as ``message`` for the turn the model should generate."""
        self.messages.append([role, message])

    def copy(self) -> Conversation:
        """Return an independent copy (messages can be appended without touching the template)."""
        return Conversation(
            system=self.system,
            roles=tuple(self.roles),
            messages=[[role, message] for role, message in self.messages],
            offset=self.offset,
            sep_style=self.sep_style,
            sep=self.sep,
            sep2=self.sep2,
            version=self.version,
        )

    def dict(self) -> dict[str, Any]:
        """JSON-serialisable view; image payloads in tuple messages are dropped."""
        return {
            "system": self.system,
            "roles": list(self.roles),
            "messages": [[role, _text_of(message)] for role, message in self.messages],
            "offset": self.offset,
            "sep_style": self.sep_style.name,
            "sep": self.sep,
            "sep2": self.sep2,
            "version": self.version,
        }


conv_qwen_1_5 = Conversation(
    system="You are a helpful assistant.",
    roles=("<|im_start|>user", "<|im_start|>assistant"),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.CHATML,
    sep="<|im_end|>",
    version="qwen",
)

conv_plain = Conversation(
    system="",
    roles=("", ""),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
    version="plain",
)

conv_vicuna_v1 = Conversation(
    system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    roles=("USER", "ASSISTANT"),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1",
)

conv_llava_llama_2 = Conversation(
    system=(
        "You are a helpful language and vision assistant. You are able to understand the visual "
        "content that the user provides, and assist the user with a variety of tasks using natural language."
    ),
    roles=("USER", "ASSISTANT"),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
    version="llama_v2",
)

default_conversation = conv_qwen_1_5

conv_templates: dict[str, Conversation] = {
    "default": conv_qwen_1_5,
    "qwen_1_5": conv_qwen_1_5,
    "qwen_2": conv_qwen_1_5,
    "plain": conv_plain,
    "vicuna_v1": conv_vicuna_v1,
    "llava_llama_2": conv_llava_llama_2,
}
