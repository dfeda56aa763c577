"""Write the offline lmms-eval task's data: rendered synthetic videos and images, and ``test.jsonl``.

    python -m playground.lmms_eval_tasks.synthetic_video_qa.prepare [--out DIR] [--num-videos 12] ...

One document per question-answer turn of the synthetic generator's video and image samples
(``playground/synthetic_data.py``), with the answer's candidates for likelihood scoring::

    {"id": "test_video_0000_q0", "media": "video", "path": "videos/test_0000.mp4", "family": "video_color",
     "question": "What color is the circle?", "answer": "red", "choices": ["red", ...], "answer_index": 0}

The task YAMLs read ``data/test.jsonl`` next to this file, relative to the repository root (run lmms-eval
from there); ``utils.py`` resolves media paths against the same folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from playground.synthetic_data import COLORS, DIRECTIONS, NUMBER_WORDS, SHAPES, generate_dataset, plan_dataset

DATA_DIR = Path(__file__).resolve().parent / "data"


def family_choices(family: str) -> list[str]:
    """Every answer a question of ``family`` can have (the candidates of the likelihood task)."""
    kind = family.split("_", 1)[1]
    if kind in ("color", "flash"):
        return list(COLORS)
    if kind == "direction":
        return list(DIRECTIONS)
    if kind == "count":
        return list(NUMBER_WORDS[1:4])
    if kind == "first":
        return list(SHAPES)
    raise ValueError(f"family {family!r} has no answer set (only video and image families are evaluated)")


def prepare(
    out: str | Path = DATA_DIR,
    num_videos: int = 12,
    num_images: int = 4,
    size: int = 64,
    frames: int = 16,
    seed: int = 0,
    split: str = "test",
) -> dict[str, Any]:
    """Render the media under ``out`` and write ``out/{split}.jsonl``; returns a summary."""
    out = Path(out)
    summary = generate_dataset(out, num_videos, num_images, 0, size=size, frames=frames, seed=seed, split=split)
    plan = plan_dataset(num_videos, num_images, 0, size=size, frames=frames, seed=seed, split=split)
    docs = []
    for sample in plan.samples:
        path = plan.video_path(sample.media_index) if sample.media == "video" else plan.image_path(sample.media_index)
        for k, qa in enumerate(sample.turns):
            choices = family_choices(qa.family)
            docs.append(
                {
                    "id": f"{sample.id}_q{k}",
                    "media": sample.media,
                    "path": path,
                    "family": qa.family,
                    "question": qa.question,
                    "answer": qa.answer,
                    "choices": choices,
                    "answer_index": choices.index(qa.answer),
                }
            )
    docs_path = out / f"{split}.jsonl"
    docs_path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    families: dict[str, int] = {}
    for doc in docs:
        families[doc["family"]] = families.get(doc["family"], 0) + 1
    return {"docs": str(docs_path), "num_docs": len(docs), "families": families, "codec": summary["codec"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DATA_DIR), help="data folder (the task YAMLs read the default)")
    parser.add_argument("--num-videos", type=int, default=12)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = prepare(args.out, args.num_videos, args.num_images, args.size, args.frames, args.seed)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
