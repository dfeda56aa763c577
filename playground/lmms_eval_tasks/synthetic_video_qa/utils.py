"""Document functions of the offline ``synthetic_video_qa`` tasks (see ``prepare.py`` for the data)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from loguru import logger
from PIL import Image

DATA_DIR = Path(__file__).resolve().parent / "data"


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    """A video document gives its file path (the model samples the frames); an image document, the image."""
    path = DATA_DIR / doc["path"]
    if doc["media"] == "image":
        with Image.open(path) as image:
            return [image.convert("RGB")]
    return [str(path)]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def normalize_answer(text: str) -> str:
    """Lower-case first word, without punctuation: ``" Red."`` -> ``"red"``."""
    words = text.strip().lower().split()
    return words[0].strip(".,!?;:'\"") if words else ""


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    prediction = normalize_answer(results[0]) if results else ""
    correct = prediction == doc["answer"]
    return {"accuracy": {"family": doc["family"], "correct": correct, "prediction": prediction}}


def aggregate_accuracy(items: list[dict[str, Any]]) -> float:
    """Percentage of exact answers; the per-family figures are logged."""
    by_family: dict[str, list[bool]] = defaultdict(list)
    for item in items:
        by_family[item["family"]].append(bool(item["correct"]))
    for family, marks in sorted(by_family.items()):
        logger.info(f"synthetic_video_qa {family}: {100 * sum(marks) / len(marks):.1f}% of {len(marks)}")
    return 100.0 * sum(bool(i["correct"]) for i in items) / max(len(items), 1)
