"""Accuracy of a checkpoint on a synthetic split, per question family, beside each family's chance level.

    python -m playground.evaluate_synthetic --model-path assets/tiny-slowfast --data DIR --split test [--out F.json]

Every question-answer turn of the split's video samples is asked on its own (single turn, greedy decoding);
an answer is right when its first word is the expected one. Each video is decoded and encoded once for all
its questions. Chance is one over the number of answers a family allows (colours 5, directions 5, counts 3,
shapes 3, flash colours 5).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import template_stop, tokenizer_image_token
from llava.video import load_video
from playground.synthetic_data import COLORS, DIRECTIONS, NUMBER_WORDS, SHAPES

FAMILY_ANSWERS: dict[str, tuple[str, ...]] = {
    "video_color": tuple(COLORS),
    "video_direction": DIRECTIONS,
    "video_count": NUMBER_WORDS[1:4],
    "video_first": SHAPES,
    "video_flash": tuple(COLORS),
    # Training-only (``synthetic_data --questions all_shape``): scored when a split has it, as on training data.
    "video_shape": SHAPES,
}
# Exact question forms of each family, matched on the text (the annotation files carry no family).
FAMILY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("What color is the ", "video_color"),
    ("Which direction does the ", "video_direction"),
    ("How many shapes are there?", "video_count"),
    ("Which shape appears first?", "video_first"),
    ("What color was the flash?", "video_flash"),
    ("Which shape is ", "video_shape"),
)


@dataclass(frozen=True)
class Question:
    video: str
    question: str
    answer: str
    family: str


def question_family(question: str) -> str:
    for prefix, family in FAMILY_PREFIXES:
        if question.startswith(prefix):
            return family
    raise ValueError(f"not a synthetic video question: {question!r}")


def load_questions(data_dir: str | Path, split: str) -> list[Question]:
    """Every (question, answer) turn of the split's video samples, in file order."""
    data_dir = Path(data_dir)
    records = json.loads((data_dir / f"{split}.json").read_text())
    questions = []
    for record in records:
        if "video" not in record:
            continue
        turns = record["conversations"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            text = human["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
            questions.append(Question(str(data_dir / record["video"]), text, gpt["value"], question_family(text)))
    return questions


def first_word(text: str) -> str:
    words = text.strip().lower().split()
    return words[0].strip(".,!?;:'\"") if words else ""


@torch.no_grad()
def answer_questions(
    tokenizer: Any, model: Any, image_processor: Any, questions: list[Question], frames: int,
    conv_mode: str = "qwen_1_5", max_new_tokens: int = 4,
) -> list[str]:
    """Greedy answers, one per question; questions on the same video share its encoding and one batch."""
    stop, stop_id = template_stop(conv_mode, tokenizer)
    eos = [i for i in (stop_id, tokenizer.eos_token_id) if i is not None]
    by_video: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        by_video[q.video].append(i)
    answers = [""] * len(questions)
    for video, indices in by_video.items():
        clip = load_video(video, frames)
        pixels = image_processor.preprocess(clip.frames, return_tensors="pt")["pixel_values"]
        tokens = model.encode_images([pixels])[0]
        rows = []
        for i in indices:
            conv = conv_templates[conv_mode].copy()
            conv.append_message(conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\n{questions[i].question}")
            conv.append_message(conv.roles[1], None)
            rows.append(tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, row in enumerate(rows):
            ids[k, width - len(row) :] = torch.tensor(row)
            mask[k, width - len(row) :] = 1
        out = model.generate(
            ids.to(model.device), attention_mask=mask.to(model.device), visual_tokens=[tokens] * len(rows),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
        )
        for k, i in enumerate(indices):
            answers[i] = tokenizer.decode(out[k], skip_special_tokens=True)
    return answers


def score(questions: list[Question], answers: list[str]) -> dict[str, Any]:
    """Per family: right answers, questions, accuracy (%) and chance (%); plus the overall accuracy."""
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for q, a in zip(questions, answers):
        total[q.family] += 1
        right[q.family] += first_word(a) == q.answer
    families = {
        f: {"right": right[f], "questions": total[f], "accuracy": 100.0 * right[f] / total[f],
            "chance": 100.0 / len(FAMILY_ANSWERS[f])}
        for f in FAMILY_ANSWERS if total[f]
    }  # fmt: skip
    overall = 100.0 * sum(right.values()) / max(sum(total.values()), 1)
    return {"families": families, "accuracy": overall, "questions": sum(total.values())}


def evaluate_checkpoint(
    model_path: str, data_dir: str, split: str, frames: int | None = None, limit: int | None = None
) -> dict[str, Any]:
    from llava.model.builder import load_pretrained_model

    tokenizer, model, image_processor, _ = load_pretrained_model(model_path, device="cpu", torch_dtype="float32")
    frames = frames or model.config.video_frames or 16
    questions = load_questions(data_dir, split)[:limit]
    start = time.perf_counter()
    answers = answer_questions(tokenizer, model, image_processor, questions, frames)
    result = score(questions, answers)
    result.update(model=model_path, split=split, frames=frames, seconds=time.perf_counter() - start)
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = ["| family | accuracy | chance | questions |", "| --- | --- | --- | --- |"]
    for family, r in result["families"].items():
        lines.append(f"| {family} | {r['accuracy']:.1f} % | {r['chance']:.1f} % | {r['questions']} |")
    lines.append(f"| all | {result['accuracy']:.1f} % | | {result['questions']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m playground.evaluate_synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--data", required=True, help="dataset root written by playground.synthetic_data")
    parser.add_argument("--split", default="test")
    parser.add_argument("--frames", type=int, default=None, help="frames per video (default: the checkpoint's)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--out", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = evaluate_checkpoint(args.model_path, args.data, args.split, args.frames, args.limit)
    print(format_table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
