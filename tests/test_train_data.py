"""Tests for llava.train.data: annotations, qwen_1_5 templating and labels, truncation, the lazy dataset,
the collator and length-grouped sampling."""

from __future__ import annotations

import json
import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import HfArgumentParser

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.model import LlavaQwenSlowFastConfig
from llava.model.tokenizer_utils import train_tiny_tokenizer
from llava.model.vision_tower import CLIP_MEAN, CLIP_STD, build_image_processor
from llava.train.data import (
    AnnotationError,
    DataArguments,
    DataCollatorForSupervisedDataset,
    LazySupervisedDataset,
    LengthGroupedSampler,
    SampleError,
    get_modality_length_grouped_indices,
    load_annotations,
    make_supervised_data_module,
    normalize_image_markers,
    preprocess_qwen,
    truncate_to_budget,
)
from llava.video import load_video

IMAGE_SIZE = 64
VIDEO_FRAMES, VIDEO_FPS, VIDEO_SIDE = 12, 6, 32
QUESTION, ANSWER = "What is the dog doing?", "The dog is running."


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


@pytest.fixture(scope="module")
def processor():
    return build_image_processor(IMAGE_SIZE)


@pytest.fixture(scope="module")
def model_config() -> LlavaQwenSlowFastConfig:
    return LlavaQwenSlowFastConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        mm_vision_tower_overrides={"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "image_size": IMAGE_SIZE},
        tokenizer_model_max_length=512,
    )


def _grey_level(index: int) -> int:
    return 10 + 20 * index


@pytest.fixture(scope="module")
def video_path(tmp_path_factory) -> Path:
    """12 frames of 32x32 at 6 fps; frame ``i`` is a flat grey of level ``_grey_level(i)``."""
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(VIDEO_FPS, 1))
        stream.width, stream.height, stream.pix_fmt = VIDEO_SIDE, VIDEO_SIDE, "yuv420p"
        stream.bit_rate = 2_000_000
        for i in range(VIDEO_FRAMES):
            frame = np.full((VIDEO_SIDE, VIDEO_SIDE, 3), _grey_level(i), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def _png(path: Path, width: int = 32, height: int = 16, colour=(255, 0, 0)) -> Path:
    Image.new("RGB", (width, height), colour).save(path)
    return path


def _qa(question: str = QUESTION, answer: str = ANSWER) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _write_json(path: Path, samples) -> Path:
    path.write_text(json.dumps(samples))
    return path


def _write_jsonl(path: Path, samples) -> Path:
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def _dataset(tmp_path, samples, tokenizer, processor, model_config, max_length=512, **data_kwargs):
    data_path = _write_json(tmp_path / "data.json", samples)
    data_kwargs.setdefault("fps", 2.0)
    args = DataArguments(data_path=str(data_path), **data_kwargs)
    return LazySupervisedDataset(str(data_path), tokenizer, processor, args, model_config, max_length=max_length)


def _decode(ids: torch.Tensor, tokenizer) -> str:
    """Decode with every -200 written back as ``<image>``."""
    pieces, current = [], []
    for token in ids.tolist():
        if token == IMAGE_TOKEN_INDEX:
            pieces.append(current)
            current = []
        else:
            current.append(token)
    pieces.append(current)
    return "<image>".join(
        tokenizer.decode(p, skip_special_tokens=False, clean_up_tokenization_spaces=False) for p in pieces
    )


def _tok(text: str, tokenizer) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


# ----------------------------------------------------------------------------- annotations


def test_load_annotations_reads_json_list(tmp_path):
    samples = [{"video": "a.mp4", "conversations": _qa()}, {"conversations": _qa("Hi?", "Hello.")}]
    assert load_annotations(_write_json(tmp_path / "d.json", samples)) == samples


def test_load_annotations_reads_jsonl_by_extension(tmp_path):
    samples = [{"image": "a.png", "conversations": _qa()}, {"conversations": _qa("Hi?", "Hello.")}]
    assert load_annotations(_write_jsonl(tmp_path / "d.jsonl", samples)) == samples


def test_load_annotations_detects_jsonl_by_content(tmp_path):
    samples = [{"conversations": _qa()}, {"conversations": _qa("Hi?", "Hello.")}]
    assert load_annotations(_write_jsonl(tmp_path / "d.json", samples)) == samples


def test_load_annotations_resolves_relative_paths_against_folders(tmp_path):
    samples = [
        {"video": "v/a.mp4", "conversations": _qa()},
        {"image": "b.png", "conversations": _qa()},
        {"video": "/abs/c.mp4", "conversations": _qa()},
    ]
    loaded = load_annotations(_write_json(tmp_path / "d.json", samples), video_folder="/videos", image_folder="/images")
    assert [s.get("video") or s.get("image") for s in loaded] == ["/videos/v/a.mp4", "/images/b.png", "/abs/c.mp4"]


def test_relative_videos_resolve_against_image_folder_without_video_folder(tmp_path, tokenizer, processor, model_config):
    # the reference's command lines give only --image_folder, for videos and images alike
    samples = [{"video": "v/a.mp4", "conversations": _qa()}, {"image": "b.png", "conversations": _qa()}]
    path = _write_json(tmp_path / "d.json", samples)
    loaded = load_annotations(path, image_folder="/media")
    assert [s.get("video") or s.get("image") for s in loaded] == ["/media/v/a.mp4", "/media/b.png"]
    dataset = _dataset(tmp_path, samples, tokenizer, processor, model_config, image_folder="/media")
    assert dataset.samples[0]["video"] == "/media/v/a.mp4"


def test_malformed_json_reports_line_and_column(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"conversations": []},\n  {"conversations": [}\n]\n')
    with pytest.raises(AnnotationError, match=r"line 3, column 22"):
        load_annotations(path)


def test_malformed_jsonl_reports_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"conversations": _qa()}) + "\n\n{oops}\n")
    with pytest.raises(AnnotationError, match=r"line 3, column 2"):
        load_annotations(path)


def test_empty_annotation_file_is_an_error(tmp_path):
    with pytest.raises(AnnotationError, match="no samples"):
        load_annotations(_write_json(tmp_path / "d.json", []))


BAD_SAMPLES = [
    (["not", "an", "object"], "a sample must be a JSON object"),
    ({"video": "a.mp4"}, "conversations: missing"),
    ({"conversations": []}, "conversations: must not be empty"),
    ({"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}, r"conversations\[0\]\.from"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}]}, r"conversations\[0\]\.value"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "y"}]}, r"conversations\[0\]\.value: missing"),
    ({"conversations": [{"from": "human", "value": "x"}] * 2}, r"conversations\[1\]\.from"),
    ({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}, r"conversations\[0\]\.from"),
    ({"conversations": _qa() + [{"from": "system", "value": "s"}]}, r"conversations\[2\]\.from.*system"),
    ({"conversations": _qa() + [{"from": "human", "value": "more?"}]}, r"conversations\[2\]\.from.*last turn"),
    ({"video": "a.mp4", "image": "b.png", "conversations": _qa()}, "video/image"),
    ({"video": 7, "conversations": _qa()}, "video: must be a non-empty string"),
    ({"image": "", "conversations": _qa()}, "image: must be a non-empty string"),
    ({"video": "a.mp4", "conversations": _qa("<image> and <image>")}, "conversations: 2 <image> markers"),
]


@pytest.mark.parametrize("bad, field", BAD_SAMPLES)
def test_invalid_sample_in_json_names_index_and_field(tmp_path, bad, field):
    path = _write_json(tmp_path / "d.json", [{"conversations": _qa()}, {"conversations": _qa()}, bad])
    with pytest.raises(AnnotationError, match=r"index 2: " + field):
        load_annotations(path)


@pytest.mark.parametrize("bad, field", BAD_SAMPLES)
def test_invalid_sample_in_jsonl_names_line_and_field(tmp_path, bad, field):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"conversations": _qa()}, bad])
    with pytest.raises(AnnotationError, match=r"line 2: " + field):
        load_annotations(path)


def test_data_arguments_parse_from_command_line():
    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        ["--data_path", "d.json", "--video_folder", "/v", "--fps", "0", "--add_time_instruction", "True"]
    )
    assert (args.data_path, args.video_folder, args.image_folder, args.fps) == ("d.json", "/v", None, 0.0)
    assert args.add_time_instruction and args.video_frames == 64 and args.image_aspect_ratio == "pad"


def test_data_arguments_reject_unknown_backend():
    with pytest.raises(ValueError, match="video_decode_backend"):
        DataArguments(data_path="d.json", video_decode_backend="ffmpeg")


# ----------------------------------------------------------------------------- prompt and labels


def test_video_sample_prompt_is_byte_exact_qwen_1_5(tmp_path, tokenizer, processor, model_config, video_path):
    samples = [{"video": str(video_path), "conversations": _qa(QUESTION + "\n<image>")}]
    item = _dataset(tmp_path, samples, tokenizer, processor, model_config)[0]
    assert _decode(item["input_ids"], tokenizer) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>\n"
        f"<|im_start|>assistant\n{ANSWER}<|im_end|>\n"
    )


def test_turn_by_turn_tokenisation_equals_whole_prompt(tokenizer):
    conversations = [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": "<image>\nWhat color is the ball?"},
        {"from": "gpt", "value": "The ball is red."},
        {"from": "human", "value": "And the box?\nBe short."},
        {"from": "gpt", "value": "Blue.\n"},
    ]
    input_ids, _ = preprocess_qwen(conversations, tokenizer, has_visual=True)
    whole = _decode(input_ids, tokenizer)
    pieces = whole.split("<image>")
    expected = _tok(pieces[0], tokenizer) + [IMAGE_TOKEN_INDEX] + _tok(pieces[1], tokenizer)
    assert input_ids.tolist() == expected
    assert whole.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n<image>\n")


def test_labels_supervise_answers_and_chatml_structure_only(tokenizer):
    second_q, second_a = "Where is the cat?", "The cat is on the table."
    conversations = _qa("<image>\n" + QUESTION) + _qa(second_q, second_a)
    input_ids, labels = preprocess_qwen(conversations, tokenizer, has_visual=True)

    start, end, nl = (_tok(t, tokenizer)[0] for t in ("<|im_start|>", "<|im_end|>", "\n"))
    ign = IGNORE_INDEX

    def ignored(text: str) -> list[int]:
        return [ign] * len(_tok(text, tokenizer))

    system = [start, *ignored("system"), nl, *ignored("You are a helpful assistant."), end, nl]
    user1 = [start, *ignored("user"), nl, ign, nl, *ignored(QUESTION), end, nl]
    answer1 = [start, *ignored("assistant"), nl, *_tok(ANSWER, tokenizer), end, nl]
    user2 = [start, *ignored("user"), nl, *ignored(second_q), end, nl]
    answer2 = [start, *ignored("assistant"), nl, *_tok(second_a, tokenizer), end, nl]
    assert labels.tolist() == system + user1 + answer1 + user2 + answer2
    assert labels.shape == input_ids.shape


def test_image_token_is_never_supervised_even_in_an_answer(tokenizer):
    conversations = _qa("Look.", "Here <image> it is.")
    input_ids, labels = preprocess_qwen(conversations, tokenizer, has_visual=True)
    assert (input_ids == IMAGE_TOKEN_INDEX).sum() == 1
    assert labels[input_ids == IMAGE_TOKEN_INDEX].tolist() == [IGNORE_INDEX]


def test_image_marker_is_moved_to_the_front_of_its_turn():
    turns = normalize_image_markers(_qa("What is\n<image>\nhappening here?"), has_visual=True)
    assert turns[0]["value"] == "<image>\nWhat is\nhappening here?"
    turns = normalize_image_markers(_qa(QUESTION + "\n<image>"), has_visual=True)
    assert turns[0]["value"] == "<image>\n" + QUESTION


def test_image_marker_is_added_to_the_first_human_turn_when_missing(tokenizer):
    conversations = [{"from": "system", "value": "Be brief."}, *_qa(), *_qa("Why?", "Fun.")]
    input_ids, _ = preprocess_qwen(conversations, tokenizer, has_visual=True)
    assert f"<|im_start|>user\n<image>\n{QUESTION}<|im_end|>" in _decode(input_ids, tokenizer)
    assert (input_ids == IMAGE_TOKEN_INDEX).sum() == 1


def test_image_marker_is_removed_without_visual_input(tokenizer):
    input_ids, _ = preprocess_qwen(_qa("<image>\n" + QUESTION), tokenizer, has_visual=False)
    assert IMAGE_TOKEN_INDEX not in input_ids.tolist()
    assert f"<|im_start|>user\n{QUESTION}<|im_end|>" in _decode(input_ids, tokenizer)


def test_text_only_sample_has_no_pixels_and_no_image_token(tmp_path, tokenizer, processor, model_config):
    item = _dataset(tmp_path, [{"conversations": _qa("<image>\n" + QUESTION)}], tokenizer, processor, model_config)[0]
    assert item["modality"] == "text" and item["pixel_values"] is None
    assert IMAGE_TOKEN_INDEX not in item["input_ids"].tolist()


def test_time_instruction_follows_the_image_marker(tmp_path, tokenizer, processor, model_config, video_path):
    samples = [{"video": str(video_path), "conversations": _qa(QUESTION)}]
    dataset = _dataset(tmp_path, samples, tokenizer, processor, model_config, add_time_instruction=True)
    info = load_video(video_path, 64, fps=2.0).info()
    assert f"<|im_start|>user\n<image>\n{info}\n{QUESTION}<|im_end|>" in _decode(dataset[0]["input_ids"], tokenizer)


# ----------------------------------------------------------------------------- truncation

IDS = torch.tensor([10, 11, IMAGE_TOKEN_INDEX, 12, 13, 14, 15, 16])
LABELS = torch.tensor([10, -100, -100, -100, 13, 14, 15, 16])


def test_truncation_leaves_a_fitting_sample_unchanged():
    ids, labels = truncate_to_budget(IDS, LABELS, max_length=11, num_fast_tokens=4)  # 8 - 1 + 4 = 11
    assert torch.equal(ids, IDS) and torch.equal(labels, LABELS)


def test_truncation_cuts_text_from_the_end_and_keeps_the_placeholder():
    ids, labels = truncate_to_budget(IDS, LABELS, max_length=9, num_fast_tokens=4)
    assert ids.tolist() == IDS[:6].tolist() and labels.tolist() == LABELS[:6].tolist()
    assert len(ids) - 1 + 4 == 9


def test_truncation_cuts_text_only_sample_to_max_length():
    text_ids, text_labels = torch.arange(1, 9), torch.arange(1, 9)
    ids, labels = truncate_to_budget(text_ids, text_labels, max_length=5, num_fast_tokens=100)
    assert ids.tolist() == [1, 2, 3, 4, 5] and labels.tolist() == [1, 2, 3, 4, 5]


def test_truncation_through_the_placeholder_raises_sample_error():
    # 5 positions minus 3 extra for the fast tokens leave 2 ids: not enough to reach position 2
    with pytest.raises(SampleError, match="visual placeholder at position 2"):
        truncate_to_budget(IDS, LABELS, max_length=5, num_fast_tokens=4)


def test_truncation_leaving_no_supervised_label_raises_sample_error():
    labels = torch.tensor([-100] * 7 + [16])
    with pytest.raises(SampleError, match="no supervised label"):
        truncate_to_budget(IDS, labels, max_length=10, num_fast_tokens=4)


def test_truncation_does_not_count_structural_tokens_as_supervision():
    with pytest.raises(SampleError, match="no supervised label"):
        truncate_to_budget(IDS, LABELS, max_length=7, num_fast_tokens=4, structural_token_ids={10})


def test_too_long_sample_is_skipped_by_the_dataset(tmp_path, tokenizer, processor, model_config, video_path):
    samples = [
        {"video": str(video_path), "conversations": _qa(QUESTION + " " + "very " * 200)},
        {"conversations": _qa()},
    ]
    dataset = _dataset(tmp_path, samples, tokenizer, processor, model_config, max_length=64)
    item = dataset[0]
    assert item["index"] == 1 and dataset.skipped_count() == 1


# ----------------------------------------------------------------------------- media loading


def test_fps_sampling_keeps_every_third_frame_of_a_6fps_video(tmp_path, tokenizer, processor, model_config, video_path):
    samples = [{"video": str(video_path), "conversations": _qa()}]
    item = _dataset(tmp_path, samples, tokenizer, processor, model_config, fps=2.0, video_frames=64)[0]
    pixels = item["pixel_values"]
    assert item["modality"] == "video" and pixels.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    levels = ((pixels[:, 0].mean(dim=(1, 2)) * CLIP_STD[0] + CLIP_MEAN[0]) * 255).tolist()
    assert levels == pytest.approx([_grey_level(i) for i in (0, 3, 6, 9)], abs=4)


def test_non_positive_fps_samples_uniformly(tmp_path, tokenizer, processor, model_config, video_path):
    samples = [{"video": str(video_path), "conversations": _qa()}]
    item = _dataset(tmp_path, samples, tokenizer, processor, model_config, fps=0, video_frames=5)[0]
    assert item["pixel_values"].shape[0] == 5


def test_image_is_padded_to_a_square_with_the_mean_colour(tmp_path, tokenizer, processor, model_config):
    samples = [{"image": str(_png(tmp_path / "wide.png", 32, 16)), "conversations": _qa()}]
    item = _dataset(tmp_path, samples, tokenizer, processor, model_config)[0]
    pixels = item["pixel_values"]
    assert item["modality"] == "image" and pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    # rows 0..15 of 64 are padding (the image fills the middle half): mean colour normalises to ~0
    assert pixels[0, :, :12].abs().max() < 0.02
    assert pixels[0, 0, 32, 32] > 1.5  # red


def test_missing_video_is_logged_with_index_and_path_and_replaced(
    tmp_path, tokenizer, processor, model_config, video_path, caplog
):
    missing = tmp_path / "missing.mp4"
    samples = [{"conversations": _qa()}, {"video": str(missing), "conversations": _qa()}, {"conversations": _qa()}]
    dataset = _dataset(tmp_path, samples, tokenizer, processor, model_config)
    with caplog.at_level(logging.WARNING, logger="llava.train.data"):
        item = dataset[1]
    assert item["index"] == 2 and dataset.skipped_count() == 1
    (record,) = caplog.records
    assert "index 1" in record.getMessage() and str(missing) in record.getMessage()
    assert "does not exist" in record.getMessage()


def test_corrupt_video_and_image_are_replaced_and_counted(tmp_path, tokenizer, processor, model_config, caplog):
    bad_video = tmp_path / "bad.mp4"
    bad_video.write_bytes(b"this is not a video" * 50)
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"nor an image" * 50)
    samples = [
        {"video": str(bad_video), "conversations": _qa()},
        {"image": str(bad_image), "conversations": _qa()},
        {"conversations": _qa()},
    ]
    dataset = _dataset(tmp_path, samples, tokenizer, processor, model_config)
    with caplog.at_level(logging.WARNING, logger="llava.train.data"):
        assert dataset[0]["index"] == 2
    assert dataset.skipped_count() == 2
    messages = [r.getMessage() for r in caplog.records]
    assert "index 0" in messages[0] and str(bad_video) in messages[0]
    assert "index 1" in messages[1] and str(bad_image) in messages[1]


def test_too_many_failures_in_a_row_raise_runtime_error_naming_the_cause(
    tmp_path, tokenizer, processor, model_config
):
    samples = [{"video": str(tmp_path / f"gone{i}.mp4"), "conversations": _qa()} for i in range(3)]
    samples.append({"conversations": _qa()})
    dataset = _dataset(tmp_path, samples, tokenizer, processor, model_config, max_consecutive_failures=2)
    with pytest.raises(RuntimeError, match=r"max_consecutive_failures=2.*gone2\.mp4.*does not exist"):
        dataset[0]


def test_skipped_count_includes_dataloader_workers(tmp_path, tokenizer, processor, model_config):
    samples = [{"video": str(tmp_path / "gone.mp4"), "conversations": _qa()}, {"conversations": _qa()}]
    dataset = _dataset(tmp_path, samples, tokenizer, processor, model_config)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1)
    assert [item["index"] for item in loader] == [1, 1]
    assert dataset.skipped_count() == 1


def test_modality_lengths_estimate_positions_with_sign_by_modality(
    tmp_path, tokenizer, processor, model_config, video_path
):
    samples = [
        {"video": str(video_path), "conversations": _qa("<image>\n" + QUESTION)},
        {"image": str(_png(tmp_path / "p.png")), "conversations": _qa()},
        {"conversations": _qa()},
    ]
    dataset = _dataset(tmp_path, samples, tokenizer, processor, model_config, fps=0, video_frames=4)
    actual = []
    for i in range(3):
        item = dataset[i]
        frames = 0 if item["pixel_values"] is None else item["pixel_values"].shape[0]
        fast = dataset.num_fast_tokens(frames) - 1 if frames else 0
        actual.append(len(item["input_ids"]) + fast)
    assert dataset.modality_lengths.tolist() == [actual[0], actual[1], -actual[2]]
    assert dataset.lengths.tolist() == actual


# ----------------------------------------------------------------------------- collator


def test_collator_right_pads_and_masks(tokenizer):
    pixels = torch.zeros(2, 3, 8, 8)
    batch = DataCollatorForSupervisedDataset(tokenizer)(
        [
            {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "pixel_values": None},
            {
                "input_ids": torch.tensor([1, -200, 3, 4, 5]),
                "labels": torch.tensor([1, -100, 3, 4, 5]),
                "pixel_values": pixels,
            },
        ]
    )
    pad = tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7, pad, pad], [1, -200, 3, 4, 5]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [1, -100, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[True, True, True, False, False], [True] * 5]
    assert len(batch["images"]) == 1 and batch["images"][0] is pixels


def test_collator_keeps_images_in_batch_order_and_none_without_any(tokenizer):
    collate = DataCollatorForSupervisedDataset(tokenizer)
    one, two = torch.zeros(1, 3, 4, 4), torch.ones(3, 3, 4, 4)
    item = {"input_ids": torch.tensor([1]), "labels": torch.tensor([1])}
    batch = collate([{**item, "pixel_values": one}, {**item, "pixel_values": None}, {**item, "pixel_values": two}])
    assert [x is y for x, y in zip(batch["images"], (one, two))] == [True, True]
    assert collate([{**item, "pixel_values": None}])["images"] is None
    assert set(batch) == {"input_ids", "labels", "attention_mask", "images"}


# ----------------------------------------------------------------------------- sampling


def _mixed_lengths() -> list[int]:
    generator = torch.Generator().manual_seed(0)
    visual = torch.randint(50, 500, (10,), generator=generator).tolist()
    text = (-torch.randint(5, 80, (7,), generator=generator)).tolist()
    return [x for pair in zip(visual, text) for x in pair] + visual[len(text) :]


def test_grouped_sampler_yields_every_index_exactly_once():
    lengths = _mixed_lengths()
    sampler = LengthGroupedSampler(2, 2, lengths, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        assert sorted(sampler) == list(range(len(lengths)))
    assert len(sampler) == len(lengths)


def test_grouped_sampler_keeps_modalities_in_separate_sorted_megabatches():
    lengths = _mixed_lengths()  # 10 visual, 7 text; megabatch 4 -> 2 + 1 full, 2 + 3 left over
    order = get_modality_length_grouped_indices(lengths, 2, 2, generator=torch.Generator().manual_seed(3))
    full = [order[k : k + 4] for k in range(0, 12, 4)]
    for chunk in full:
        signs = {lengths[i] > 0 for i in chunk}
        assert len(signs) == 1
        assert [abs(lengths[i]) for i in chunk] == sorted((abs(lengths[i]) for i in chunk), reverse=True)
    assert sorted(len(chunk) for chunk in full if lengths[chunk[0]] > 0) == [4, 4]
    tail = order[12:]
    assert [lengths[i] > 0 for i in tail] == [True, True, False, False, False]


def test_grouped_sampler_is_deterministic_for_a_seeded_generator():
    lengths = _mixed_lengths()
    first = get_modality_length_grouped_indices(lengths, 2, 2, generator=torch.Generator().manual_seed(5))
    second = get_modality_length_grouped_indices(lengths, 2, 2, generator=torch.Generator().manual_seed(5))
    assert first == second


def test_seeded_grouped_sampler_draws_each_epoch_from_the_seed_and_the_epoch_only():
    lengths = _mixed_lengths()
    sampler = LengthGroupedSampler(2, 2, lengths, seed=11)
    epoch0 = list(sampler)
    assert list(sampler) == epoch0
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and sorted(epoch1) == list(range(len(lengths)))
    # a resumed run builds a new sampler: set to the same epoch it draws the same order, whatever torch's RNG
    resumed = LengthGroupedSampler(2, 2, lengths, seed=11)
    resumed.set_epoch(1)
    torch.manual_seed(123)
    assert list(resumed) == epoch1


def test_make_supervised_data_module_wires_dataset_and_collator(tmp_path, tokenizer, processor, model_config):
    data_path = _write_json(tmp_path / "d.json", [{"conversations": _qa()}])
    args = DataArguments(data_path=str(data_path))
    module = make_supervised_data_module(tokenizer, processor, args, model_config, 128)
    assert set(module) == {"train_dataset", "eval_dataset", "data_collator"} and module["eval_dataset"] is None
    assert module["train_dataset"].max_length == 128
    batch = module["data_collator"]([module["train_dataset"][0]])
    assert batch["input_ids"].shape[0] == 1 and batch["images"] is None


def test_processor_size_must_match_the_models_tower(tmp_path, tokenizer, model_config):
    data_path = _write_json(tmp_path / "d.json", [{"conversations": _qa()}])
    with pytest.raises(ValueError, match="crops to 96 px but the model's vision tower expects 64 px"):
        LazySupervisedDataset(
            str(data_path), tokenizer, build_image_processor(96), DataArguments(data_path=str(data_path)), model_config
        )
