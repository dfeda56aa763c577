"""A tiny, offline, Qwen2-compatible tokenizer for tests and toy models.

The real Qwen2 tokenizer cannot be downloaded here, so this trains a byte-level BPE with the same
pre-tokenisation, decoding and special tokens on a small synthetic English corpus, in well under a
second, and wraps it in :class:`transformers.Qwen2Tokenizer` so it saves and reloads through
``AutoTokenizer`` like the real one.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# Qwen2's order; like in Qwen2 they take the last ids of the vocabulary.
QWEN2_SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

# Qwen2's split: contractions, letter runs with one optional leading non-letter, single digits,
# punctuation runs, newlines and whitespace.
_QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "gray"]
_SHAPES = ["circle", "square", "triangle", "rectangle", "star", "line", "cube", "ball", "box", "dot"]
_OBJECTS = (
    "person man woman child dog cat car bird ball table chair door "
    "window tree house road phone cup book bike horse boat kitchen room"
).split()
_DIRECTIONS = ["left", "right", "up", "down", "forward", "backward", "toward the camera", "away", "around"]
_VERBS = (
    "moving running walking jumping sitting standing talking eating holding "
    "opening closing turning falling rolling cooking playing reading writing"
).split()
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_QUESTIONS = [
    "What is the {obj} doing in the video?",
    "What color is the {shape}?",
    "How many {obj}s are there in the video?",
    "Which direction is the {obj} moving?",
    "Is the {colour} {shape} on the left or on the right?",
    "What happens after the {obj} starts {verb}?",
    "Describe the video in detail.",
    "Where is the {obj} at the end of the clip?",
    "Why is the {obj} {verb}?",
    "When does the {colour} {shape} appear?",
]
_ANSWERS = [
    "The {obj} is {verb} {direction}.",
    "The {shape} is {colour}.",
    "There are {count} {obj}s in the video.",
    "It moves {direction} at frame {num}.",
    "A {colour} {shape} appears next to the {obj}.",
    "In the first {num} seconds, the {obj} keeps {verb}.",
    "Answer with the option's letter from the given choices directly. A. {colour} B. {shape} C. {obj} D. {count}",
]
_FILLER = (
    "the a an and or but of to in on at with from by for is are was were be been it this that these "
    "those there here what which who when where why how yes no not very some many more most first last "
    "next before after then video image frame clip scene camera time second minute start end question "
    "answer option letter choice please describe explain user assistant system helpful I you we they"
)


def _builtin_corpus() -> Iterator[str]:
    """Deterministic synthetic sentences covering the vocabulary of video QA prompts."""
    yield _FILLER
    yield " ".join(str(i) for i in range(0, 1000, 7))
    yield "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'\"()[]{}<>-_/\\|@#$%^&*+=~`"
    yield "<image>\nWhat is happening in this video?"
    for i, (template, answer) in enumerate(itertools.product(_QUESTIONS, _ANSWERS)):
        # Walk the word lists with co-prime strides so combinations vary without randomness.
        fields = {
            "obj": _OBJECTS[(3 * i) % len(_OBJECTS)],
            "shape": _SHAPES[(5 * i) % len(_SHAPES)],
            "colour": _COLOURS[(7 * i) % len(_COLOURS)],
            "verb": _VERBS[(11 * i) % len(_VERBS)],
            "direction": _DIRECTIONS[(13 * i) % len(_DIRECTIONS)],
            "count": _NUMBER_WORDS[i % len(_NUMBER_WORDS)],
            "num": str((17 * i) % 120),
        }
        yield f"{template.format(**fields)}\n{answer.format(**fields)}"
    for colour, shape in itertools.product(_COLOURS, _SHAPES):
        yield f"A {colour} {shape}. The {shape} is {colour}."
    for obj, verb in itertools.product(_OBJECTS, _VERBS):
        yield f"The {obj} is {verb}."
    for i, question in enumerate(_QUESTIONS):
        fields = {"obj": _OBJECTS[i], "shape": _SHAPES[i], "colour": _COLOURS[i], "verb": _VERBS[i]}
        yield (
            f"{IM_START_TOKEN}system\nYou are a helpful assistant.{IM_END_TOKEN}\n"
            f"{IM_START_TOKEN}user\n<image>\n{question.format(**fields)}{IM_END_TOKEN}\n"
            f"{IM_START_TOKEN}assistant\n"
        )


def _qwen2_pipeline(tokenizer: Tokenizer) -> None:
    """Install Qwen2's normaliser, pre-tokeniser and decoder on ``tokenizer``."""
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()


def train_tiny_tokenizer(
    vocab_size: int = 512,
    extra_texts: list[str] | None = None,
    model_max_length: int = 32768,
) -> Qwen2Tokenizer:
    """Train a byte-level BPE tokenizer with Qwen2's special tokens and chat template.

    ``vocab_size`` counts the 256 byte symbols and the three special tokens; it is an upper bound
    (training stops early when the corpus has no more pairs to merge). ``extra_texts`` are added to
    the built-in corpus. The result is deterministic for the same arguments.
    """
    n_special = len(QWEN2_SPECIAL_TOKENS)
    n_bytes = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_bytes + n_special:
        raise ValueError(f"vocab_size must be at least {n_bytes + n_special}, got {vocab_size}")

    backend = Tokenizer(models.BPE())
    _qwen2_pipeline(backend)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_special,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    corpus = list(_builtin_corpus()) + list(extra_texts or [])
    backend.train_from_iterator(corpus, trainer=trainer)

    vocab = backend.get_vocab(with_added_tokens=False)
    for token in QWEN2_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    merges = _merges_of(backend)

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=IM_END_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        model_max_length=model_max_length,
        chat_template=CHATML_TEMPLATE,
    )
    return tokenizer


def _merges_of(backend: Tokenizer) -> list[tuple[str, str]]:
    """The trained BPE merge list, in priority order."""
    model = json.loads(backend.to_str())["model"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
