"""The tiny video-QA task's tools: tower pretraining targets and per-family scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model
from playground.evaluate_synthetic import FAMILY_ANSWERS, Question, first_word, question_family, score
from playground.pretrain_tower import NUM_LABELS, cell_targets, label_maps, pretrain_tower
from playground.synthetic_data import COLORS, SHAPES, FlashSpec, SceneSpec, ShapeSpec, scene_questions, shape_questions


def scene() -> SceneSpec:
    square = ShapeSpec("square", "red", 10, x=4, y=4, direction="right", speed=2.0, appear=0)
    circle = ShapeSpec("circle", "blue", 12, x=40, y=40, direction="still", speed=0.0, appear=2)
    return SceneSpec(64, 8, (20, 20, 20), (square, circle), FlashSpec("yellow", 4, 40, 8, frame=3))


def test_label_maps_mark_each_shapes_colour_and_type_and_the_flash():
    labels = label_maps(scene())
    colors, shapes = list(COLORS), list(SHAPES)
    assert labels[0, 8, 8, colors.index("red")] and labels[0, 8, 8, len(colors) + shapes.index("square")]
    assert labels[5, 8, 8 + 10, colors.index("red")]  # the square moved 2 px per frame
    assert not labels[1, 46, 46].any() and labels[2, 46, 46, colors.index("blue")]  # the circle appears at 2
    assert labels[3, 9, 41, colors.index("yellow")] and not labels[4, 9, 41].any()  # the flash: frame 3 only
    assert labels.shape == (8, 64, 64, NUM_LABELS)


def test_cell_targets_flag_a_label_when_any_pixel_of_the_cell_has_it():
    labels = np.zeros((1, 16, 16, NUM_LABELS), dtype=bool)
    labels[0, 9, 2, 0] = True  # row 9, col 2 -> cell (1, 0) of a 2x2 grid
    targets = cell_targets(labels, grid=2)
    assert targets.shape == (1, 4, NUM_LABELS)
    assert targets[0, 2, 0] == 1 and targets.sum() == 1


def test_pretrained_tower_file_loads_into_a_model_with_the_same_tower(tmp_path):
    overrides = {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "image_size": 64, "output_stride": 16}
    summary = pretrain_tower(tmp_path / "tower.safetensors", 64, [1, 1, 1, 1], [8, 16, 24, 32], 16, steps=2,
                             scenes_per_step=2, frames_per_scene=3, log_every=1)  # fmt: skip
    assert summary["grid"] == 4 and 0 <= summary["cell_label_accuracy"] <= 1
    model = tiny_model(mm_vision_tower_overrides=overrides)
    before = model.get_vision_tower().vision_tower.stem[0].weight.clone()
    model.load_vision_tower_weights(summary["out"])
    assert not torch.equal(before, model.get_vision_tower().vision_tower.stem[0].weight)


def test_every_video_question_form_maps_to_its_family():
    for family, qas in scene_questions(scene(), "video").items():
        for qa in qas:
            assert question_family(qa.question) == family
            assert qa.answer in FAMILY_ANSWERS[family]
    for qa in shape_questions(scene()):
        assert question_family(qa.question) == qa.family == "video_shape" and qa.answer in FAMILY_ANSWERS[qa.family]
    with pytest.raises(ValueError, match="not a synthetic video question"):
        question_family("What is the capital of France?")


def test_score_counts_an_answer_right_by_its_first_word():
    questions = [Question("v.mp4", "What color was the flash?", "yellow", "video_flash"),
                 Question("v.mp4", "How many shapes are there?", "two", "video_count")]  # fmt: skip
    result = score(questions, ["Yellow.", "three shapes"])
    assert first_word(" Red, then") == "red"
    assert result["families"]["video_flash"]["accuracy"] == 100.0
    assert result["families"]["video_count"]["accuracy"] == 0.0
    assert result["families"]["video_count"]["chance"] == pytest.approx(100 / 3)
    assert result["accuracy"] == 50.0
