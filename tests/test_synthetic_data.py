"""Tests for playground/synthetic_data.py: determinism, question families, answers against pixels, files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from playground.synthetic_data import (
    COLORS,
    DIRECTIONS,
    FAMILIES,
    FLASH_RATE,
    SHAPES,
    TRAINING_ONLY_FAMILIES,
    DatasetPlan,
    SceneSpec,
    generate_dataset,
    main,
    plan_dataset,
    render_scene,
    scene_questions,
    shape_mask,
)

SMALL = dict(num_videos=8, num_images=4, num_text=4, size=64, frames=8, seed=3, split="train")
NUMBERS = {"one": 1, "two": 2, "three": 3}

COLOR_Q = re.compile(r"^What color is the (square|circle|triangle)\?$")
DIRECTION_Q = re.compile(r"^Which direction does the (\w+) (square|circle|triangle) move\?$")
COUNT_Q = "How many shapes are there?"
FIRST_Q = "Which shape appears first?"
FLASH_Q = "What color was the flash?"


@pytest.fixture(scope="module")
def plan() -> DatasetPlan:
    return plan_dataset(**SMALL)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic")
    return root, generate_dataset(root, fps=8, **SMALL)


def _turns(record: dict) -> list[tuple[str, str]]:
    """``(question, answer)`` pairs of a record, with the ``<image>\\n`` prefix removed."""
    conv = record["conversations"]
    return [(conv[k]["value"].removeprefix("<image>\n"), conv[k + 1]["value"]) for k in range(0, len(conv), 2)]


def _video_qas(plan: DatasetPlan) -> list[tuple[SceneSpec, str, str]]:
    """Every ``(scene, question, answer)`` of the video samples, read from the serialised records."""
    out = []
    for sample, record in zip(plan.samples, plan.records()):
        if sample.media == "video":
            out += [(plan.videos[sample.media_index], q, a) for q, a in _turns(record)]
    return out


def _shape_named(spec: SceneSpec, shape: str):
    (match,) = [s for s in spec.shapes if s.shape == shape]
    return match


def _trim(mask: np.ndarray) -> np.ndarray:
    """``mask`` cropped to the bounding box of its ``True`` pixels."""
    rows, cols = np.nonzero(mask)
    return mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _colour_mask(frame: np.ndarray, color: str) -> np.ndarray:
    return (frame == COLORS[color]).all(axis=-1)


# ----------------------------------------------------------------- determinism


def test_same_seed_writes_byte_identical_json(tmp_path: Path, written) -> None:
    root, _ = written
    generate_dataset(tmp_path, fps=8, **SMALL)

    assert (tmp_path / "train.json").read_bytes() == (root / "train.json").read_bytes()
    assert (tmp_path / "train.jsonl").read_bytes() == (root / "train.jsonl").read_bytes()


def test_same_seed_renders_identical_frames(plan: DatasetPlan) -> None:
    again = plan_dataset(**SMALL)

    assert again == plan
    for first, second in zip(plan.videos, again.videos):
        assert np.array_equal(render_scene(first), render_scene(second))


def test_different_seed_gives_different_dataset(plan: DatasetPlan) -> None:
    other = plan_dataset(**{**SMALL, "seed": SMALL["seed"] + 1})

    assert other.records() != plan.records()
    assert not np.array_equal(render_scene(other.videos[0]), render_scene(plan.videos[0]))


def test_same_seed_in_another_split_gives_different_content(plan: DatasetPlan) -> None:
    other = plan_dataset(**{**SMALL, "split": "val"})

    assert other.videos != plan.videos


def test_changing_image_count_leaves_videos_unchanged(plan: DatasetPlan) -> None:
    other = plan_dataset(**{**SMALL, "num_images": 1, "num_videos": 5})

    assert other.videos == plan.videos[:5]


def test_two_splits_in_one_directory_do_not_collide(tmp_path: Path) -> None:
    small = dict(num_videos=2, num_images=1, num_text=1, size=64, frames=8)
    train = generate_dataset(tmp_path, seed=0, split="train", **small)
    val = generate_dataset(tmp_path, seed=1, split="val", **small)

    assert not set(train["videos"] + train["images"]) & set(val["videos"] + val["images"])
    for summary in (train, val):
        records = json.loads(Path(summary["json"]).read_text())
        media = {r.get("video") or r.get("image") for r in records} - {None}
        assert media == set(summary["videos"] + summary["images"])
        assert all((tmp_path / m).is_file() for m in media)


# ----------------------------------------------------------------- questions


def test_every_question_family_appears(plan: DatasetPlan) -> None:
    counts = plan.family_counts()

    assert set(counts) == set(FAMILIES)
    assert all(counts[f] > 0 for f in FAMILIES if f not in TRAINING_ONLY_FAMILIES), counts
    assert all(counts[f] == 0 for f in TRAINING_ONLY_FAMILIES), counts


def test_video_questions_have_the_exact_forms_and_valid_answers(plan: DatasetPlan) -> None:
    for _, question, answer in _video_qas(plan):
        if COLOR_Q.match(question):
            assert answer in COLORS
        elif m := DIRECTION_Q.match(question):
            assert m.group(1) in COLORS and answer in DIRECTIONS
        elif question == COUNT_Q:
            assert answer in NUMBERS
        elif question == FLASH_Q:
            assert answer in COLORS
        else:
            assert question == FIRST_Q and answer in SHAPES


def test_shape_types_and_colours_are_unique_within_a_scene(plan: DatasetPlan) -> None:
    for spec in plan.videos + plan.images:
        assert len({s.shape for s in spec.shapes}) == len(spec.shapes)
        assert len({s.color for s in spec.shapes}) == len(spec.shapes)


def test_shapes_are_10_to_30_percent_of_the_frame_height(plan: DatasetPlan) -> None:
    for spec in plan.videos + plan.images:
        assert all(0.1 * spec.size <= s.size <= 0.3 * spec.size for s in spec.shapes)


def test_first_question_is_asked_only_when_one_shape_appears_before_the_others(plan: DatasetPlan) -> None:
    for spec, question, _ in _video_qas(plan):
        if question == FIRST_Q:
            appears = sorted(s.appear for s in spec.shapes)
            assert appears[0] < appears[1]


def test_flash_question_is_asked_only_about_a_flash_no_shape_shares_the_colour_of(plan: DatasetPlan) -> None:
    asked = 0
    for spec, question, answer in _video_qas(plan):
        if question == FLASH_Q:
            asked += 1
            assert spec.flash is not None and answer == spec.flash.color
            assert answer not in {s.color for s in spec.shapes}
    assert asked > 0


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_flash_rate_sets_which_videos_show_a_flash(rate: float) -> None:
    plan = plan_dataset(**{**SMALL, "num_videos": 40}, flash_rate=rate)
    for i, spec in enumerate(plan.videos):
        # Every fifth video is asked the flash first and always has one; the rate decides for the others.
        assert (spec.flash is not None) == (i % 5 == 4 or rate == 1.0), i


def test_default_flash_rate_draws_the_scenes_every_split_has_had(plan: DatasetPlan) -> None:
    assert plan_dataset(**SMALL, flash_rate=FLASH_RATE) == plan
    assert plan_dataset(**SMALL, flash_rate=0.9).videos != plan.videos


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), "0.5"])
def test_flash_rate_outside_zero_to_one_is_rejected_by_name(rate) -> None:
    with pytest.raises(ValueError, match="flash_rate"):
        plan_dataset(**SMALL, flash_rate=rate)


def test_cli_flash_rate_reaches_the_plan(tmp_path: Path, capsys) -> None:
    main(["--out", str(tmp_path), "--num-videos", "10", "--num-images", "0", "--num-text", "0", "--frames", "8",
          "--seed", "3", "--flash-rate", "1"])  # fmt: skip
    records = json.loads((tmp_path / "train.json").read_text())
    assert all(spec.flash is not None for spec in plan_dataset(10, 0, 0, 64, 8, 3, "train", flash_rate=1.0).videos)
    assert records == plan_dataset(10, 0, 0, 64, 8, 3, "train", flash_rate=1.0).records()
    assert json.loads(capsys.readouterr().out)["num_samples"] == len(records)


# ----------------------------------------------------------------- answers against pixels


def test_flash_is_a_small_mark_visible_in_exactly_one_middle_frame(plan: DatasetPlan) -> None:
    flashed = [spec for spec in plan.videos if spec.flash is not None]
    assert flashed
    for spec in flashed:
        f = spec.flash
        assert f.size <= 0.1 * spec.size and 0 < f.frame < spec.frames - 1
        video = render_scene(spec)
        patch = video[:, f.y : f.y + f.size, f.x : f.x + f.size].reshape(spec.frames, -1, 3)
        shown = [t for t in range(spec.frames) if (patch[t] == COLORS[f.color]).all()]
        assert shown == [f.frame]


def test_colour_answer_is_the_colour_at_the_shape_start(plan: DatasetPlan) -> None:
    checked = 0
    for spec, question, answer in _video_qas(plan):
        if m := COLOR_Q.match(question):
            shape = _shape_named(spec, m.group(1))
            row, col = shape.center(shape.appear)
            assert tuple(render_scene(spec)[shape.appear, row, col]) == COLORS[answer]
            checked += 1
    assert checked


def test_direction_answer_matches_the_centroid_motion(plan: DatasetPlan) -> None:
    checked = 0
    for spec, question, answer in _video_qas(plan):
        if m := DIRECTION_Q.match(question):
            color, kind = m.groups()
            video = render_scene(spec)
            start = _shape_named(spec, kind).appear
            (y0, x0), (y1, x1) = (np.argwhere(_colour_mask(video[t], color)).mean(axis=0) for t in (start, -1))
            dx, dy = x1 - x0, y1 - y0
            expected = {"right": dx > 0 and dy == 0, "left": dx < 0 and dy == 0, "down": dy > 0 and dx == 0,
                        "up": dy < 0 and dx == 0, "still": dx == 0 and dy == 0}  # fmt: skip
            assert expected[answer], (question, answer, dx, dy)
            checked += 1
    assert checked


def test_count_answer_matches_distinct_colours_in_the_last_frame(plan: DatasetPlan) -> None:
    checked = 0
    for spec, question, answer in _video_qas(plan):
        if question == COUNT_Q:
            last = render_scene(spec)[-1].reshape(-1, 3)
            colours = {tuple(p) for p in np.unique(last, axis=0)} - {spec.background}
            assert len(colours) == NUMBERS[answer]
            checked += 1
    assert checked


def test_first_answer_is_the_only_shape_drawn_in_the_first_frame(plan: DatasetPlan) -> None:
    checked = 0
    for spec, question, answer in _video_qas(plan):
        if question == FIRST_Q:
            drawn = _trim((render_scene(spec)[0] != spec.background).any(axis=-1))
            # Every shape's bounding box is its full width wide, while a triangle's apex row may be empty.
            assert np.array_equal(drawn, _trim(shape_mask(answer, drawn.shape[1])))
            checked += 1
    assert checked


def test_decoded_colours_stay_closest_to_the_answer_colour(plan: DatasetPlan, written) -> None:
    root, _ = written
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names])
    for i, spec in enumerate(plan.videos):
        with av.open(str(root / plan.video_path(i))) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        for shape in spec.shapes:
            row, col = shape.center(spec.frames - 1)
            pixel = frames[-1][row, col].astype(int)
            assert names[int(np.argmin(((palette - pixel) ** 2).sum(axis=1)))] == shape.color


# ----------------------------------------------------------------- files


def test_videos_decode_with_the_requested_frame_count_and_size(written) -> None:
    root, summary = written
    assert len(summary["videos"]) == SMALL["num_videos"]
    for path in summary["videos"]:
        with av.open(str(root / path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == SMALL["frames"]
        assert frames[0].shape == (SMALL["size"], SMALL["size"], 3)


def test_images_are_pngs_of_one_static_frame(plan: DatasetPlan, written) -> None:
    root, _ = written
    for i, spec in enumerate(plan.images):
        pixels = np.asarray(Image.open(root / plan.image_path(i)).convert("RGB"))
        assert np.array_equal(pixels, render_scene(spec)[0])
        assert spec.frames == 1 and all(s.direction == "still" for s in spec.shapes)


def test_media_samples_start_with_the_image_token_only_in_the_first_turn(written) -> None:
    root, _ = written
    for record in json.loads((root / "train.json").read_text()):
        if "video" not in record and "image" not in record:
            continue
        conv = record["conversations"]
        assert [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum("<image>" in c["value"] for c in conv) == 1


def test_image_samples_ask_colour_or_count_questions(written) -> None:
    root, _ = written
    records = [r for r in json.loads((root / "train.json").read_text()) if "image" in r]
    assert records
    for record in records:
        assert "video" not in record
        for question, answer in _turns(record):
            assert (COLOR_Q.match(question) and answer in COLORS) or (question == COUNT_Q and answer in NUMBERS)


def test_text_only_samples_have_no_media_and_no_image_token(written) -> None:
    root, _ = written
    records = [r for r in json.loads((root / "train.json").read_text()) if "video" not in r and "image" not in r]
    assert len(records) == SMALL["num_text"]
    for record in records:
        assert [c["from"] for c in record["conversations"]] == ["human", "gpt"]
        assert all("<image>" not in c["value"] and c["value"] for c in record["conversations"])


def test_mixing_blue_and_yellow_gives_green(plan: DatasetPlan) -> None:
    mixes = [qa for s in plan.samples for qa in s.turns if qa.family == "text_mix"]
    for qa in mixes:
        if set(re.findall(r"\w+", qa.question)) >= {"blue", "yellow"}:
            assert qa.answer == "green"
    assert mixes


def test_jsonl_holds_the_same_records_as_json(written) -> None:
    root, _ = written
    lines = (root / "train.jsonl").read_text().splitlines()

    assert [json.loads(line) for line in lines] == json.loads((root / "train.json").read_text())


def test_summary_counts_match_the_written_json(written) -> None:
    root, summary = written
    records = json.loads((root / "train.json").read_text())

    assert summary["num_samples"] == len(records)
    assert summary["num_video_samples"] == sum("video" in r for r in records)
    assert sum(summary["families"].values()) == sum(len(r["conversations"]) // 2 for r in records)


def test_cli_writes_the_dataset_and_prints_the_summary(tmp_path: Path, capsys) -> None:
    main(["--out", str(tmp_path), "--num-videos", "1", "--num-images", "1", "--num-text", "1", "--frames", "8",
          "--split", "dev", "--seed", "5"])  # fmt: skip

    summary = json.loads(capsys.readouterr().out)
    assert summary["num_samples"] == len(json.loads((tmp_path / "dev.json").read_text()))
    assert (tmp_path / "videos" / "dev_0000.mp4").is_file() and (tmp_path / "images" / "dev_0000.png").is_file()


@pytest.mark.parametrize(
    "overrides",
    [{"size": 63}, {"size": 256}, {"frames": 4}, {"split": "a/b"}, {"num_videos": -1}, {"questions": "some"}],
)
def test_invalid_arguments_are_rejected(overrides: dict) -> None:
    with pytest.raises(ValueError):
        plan_dataset(**{**SMALL, **overrides})


# ----------------------------------------------------------------- every question of a video


@pytest.fixture(scope="module")
def plan_all() -> DatasetPlan:
    return plan_dataset(**{**SMALL, "num_videos": 40}, questions="all")


def test_all_questions_mode_draws_the_same_scenes_images_and_text(plan_all: DatasetPlan) -> None:
    sampled = plan_dataset(**{**SMALL, "num_videos": 40})
    assert plan_all.videos == sampled.videos and plan_all.images == sampled.images
    assert [s for s in plan_all.samples if s.media != "video"] == [s for s in sampled.samples if s.media != "video"]


def test_all_questions_mode_asks_each_video_every_question_once_in_one_conversation(plan_all: DatasetPlan) -> None:
    video_samples = [s for s in plan_all.samples if s.media == "video"]
    assert [s.media_index for s in video_samples] == list(range(len(plan_all.videos)))
    for sample in video_samples:
        expected = [qa for qas in scene_questions(plan_all.videos[sample.media_index]).values() for qa in qas]
        assert sorted(sample.turns, key=repr) == sorted(expected, key=repr)


def test_all_questions_mode_never_names_a_colour_before_its_colour_question(plan_all: DatasetPlan) -> None:
    orders = set()
    for record in plan_all.records():
        if "video" not in record:
            continue
        questions = [q for q, _ in _turns(record)]
        orders.add(tuple(q.split()[0] for q in questions))
        for k, question in enumerate(questions):
            if (match := DIRECTION_Q.match(question)) is not None:
                assert f"What color is the {match.group(2)}?" in questions[:k], questions
    assert len(orders) > 5  # the order is random, not one fixed layout


# ----------------------------------------------------------------- which shape has each colour


@pytest.fixture(scope="module")
def plan_all_shape() -> DatasetPlan:
    return plan_dataset(**{**SMALL, "num_videos": 40}, questions="all_shape")


def test_all_shape_mode_is_all_plus_a_conversation_of_shape_questions(
    plan_all: DatasetPlan, plan_all_shape: DatasetPlan
) -> None:
    assert plan_all_shape.videos == plan_all.videos and plan_all_shape.images == plan_all.images
    first = [s for s in plan_all_shape.samples if s.media != "video" or s.id.endswith("_0")]
    assert first == list(plan_all.samples)
    second = [s for s in plan_all_shape.samples if s.media == "video" and s.id.endswith("_1")]
    assert [s.media_index for s in second] == list(range(len(plan_all_shape.videos)))
    for sample in second:
        spec = plan_all_shape.videos[sample.media_index]
        assert sorted((qa.question, qa.answer) for qa in sample.turns) == sorted(
            (f"Which shape is {s.color}?", s.shape) for s in spec.shapes
        )
        assert {qa.family for qa in sample.turns} == {"video_shape"}


def test_all_shape_flash_mode_asks_the_flash_again_last_in_the_shape_conversation(
    plan_all_shape: DatasetPlan,
) -> None:
    plan = plan_dataset(**{**SMALL, "num_videos": 40}, questions="all_shape_flash")
    assert plan.videos == plan_all_shape.videos
    flashes = 0
    for sample, shaped in zip(plan.samples, plan_all_shape.samples, strict=True):
        spec = plan.videos[sample.media_index] if sample.media == "video" else None
        if spec is None or sample.id.endswith("_0"):
            assert sample == shaped
            continue
        assert sample.turns[: len(shaped.turns)] == shaped.turns
        extra = sample.turns[len(shaped.turns) :]
        if spec.flash is None:
            assert extra == ()
        else:
            flashes += 1
            assert [(qa.family, qa.answer) for qa in extra] == [("video_flash", spec.flash.color)]
            assert spec.flash.color not in {s.color for s in spec.shapes}
    assert flashes >= 8  # every fifth video's primary question is the flash


def test_shape_questions_never_share_a_conversation_with_colour_or_direction(plan_all_shape: DatasetPlan) -> None:
    # Either would give the other's answer away: "What color is the square?" -> red, "Which shape is red?".
    for sample in plan_all_shape.samples:
        families = {qa.family for qa in sample.turns}
        if "video_shape" in families:
            assert families == {"video_shape"}, sample
    for sample in plan_dataset(**{**SMALL, "num_videos": 40}, questions="all_shape_flash").samples:
        families = {qa.family for qa in sample.turns}
        if "video_shape" in families:
            assert families <= {"video_shape", "video_flash"}, sample


def test_shape_question_answers_match_the_pixels(plan_all_shape: DatasetPlan) -> None:
    for sample in plan_all_shape.samples[:20]:
        if sample.media != "video" or not sample.id.endswith("_1"):
            continue
        spec = plan_all_shape.videos[sample.media_index]
        frames = render_scene(spec)
        for qa in sample.turns:
            color = qa.question.removeprefix("Which shape is ").removesuffix("?")
            shape = next(s for s in spec.shapes if s.shape == qa.answer)
            t = spec.frames - 1  # every shape is on screen in the last frame
            x, y = shape.position(t)
            box = frames[t, y : y + shape.size, x : x + shape.size][shape_mask(shape.shape, shape.size)]
            assert (box == COLORS[color]).all(axis=-1).mean() > 0.9


def test_evaluation_reads_the_shape_family_only_where_a_split_has_it(tmp_path: Path) -> None:
    from playground.evaluate_synthetic import FAMILY_ANSWERS, load_questions, question_family

    assert question_family("Which shape is red?") == "video_shape"
    assert question_family("Which shape appears first?") == "video_first"
    generate_dataset(tmp_path, **{**SMALL, "num_videos": 5, "num_images": 0, "num_text": 0}, questions="all_shape")
    families = {q.family for q in load_questions(tmp_path, "train")}
    assert "video_shape" in families and families <= set(FAMILY_ANSWERS)
