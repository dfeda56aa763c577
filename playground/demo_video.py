"""The project's demo video, ``assets/demo.mp4``: one fixed scene of the synthetic task's domain.

    python -m playground.demo_video [--out assets/demo.mp4]

64 x 64 pixels, 16 frames at 8 fps, on a plain dark-grey background: a red square slides right along the
top, a blue circle slides down on the right, and a small yellow mark flashes in frame 9 only. It is drawn by
the same renderer as the training data (:func:`playground.synthetic_data.render_scene`), at the size and
length the tiny checkpoint in ``assets/tiny-slowfast`` was trained on, so the questions of
:data:`DEMO_QUESTIONS` have exact answers that the checkpoint should give.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from playground.synthetic_data import FlashSpec, SceneSpec, ShapeSpec, render_scene, scene_questions, write_video

__all__ = ["DEMO_FPS", "DEMO_QUESTIONS", "DEMO_SCENE", "write_demo_video"]

DEMO_FPS = 8
DEMO_SCENE = SceneSpec(
    size=64,
    frames=16,
    background=(40, 40, 40),
    shapes=(
        # 14 px boxes (22 % of the height), travelling 42 and 26 px over the 15 steps of the clip.
        ShapeSpec("square", "red", 14, x=4, y=6, direction="right", speed=42 / 15, appear=0),
        ShapeSpec("circle", "blue", 14, x=44, y=22, direction="down", speed=26 / 15, appear=0),
    ),
    flash=FlashSpec("yellow", size=4, x=12, y=46, frame=9),
)


def _demo_questions() -> dict[str, str]:
    """Question -> answer, one per question the scene answers (computed from the scene, not written out)."""
    return {qa.question: qa.answer for qas in scene_questions(DEMO_SCENE).values() for qa in qas}


DEMO_QUESTIONS: dict[str, str] = _demo_questions()


def write_demo_video(out: str | os.PathLike[str] = "assets/demo.mp4") -> str:
    """Render :data:`DEMO_SCENE` to ``out`` (parents created); returns the codec used."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_video(render_scene(DEMO_SCENE), path, fps=DEMO_FPS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m playground.demo_video", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="assets/demo.mp4", help="output file (default: assets/demo.mp4)")
    args = parser.parse_args(argv)
    codec = write_demo_video(args.out)
    print(f"wrote {args.out} ({codec})")
    for question, answer in DEMO_QUESTIONS.items():
        print(f"  {question} -> {answer}")


if __name__ == "__main__":
    main()
