"""Data mixtures (llava.train.mixture): per-source amounts drawn with a seed, per-source folders, the counts
logged at start-up, and start-up errors that name the source and the line."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from llava.train.data import DataArguments, LazySupervisedDataset, load_training_samples
from llava.train.mixture import MixtureError, is_mixture_file, load_mixture

QA = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A shape."}]


def _annotations(path: Path, media: str | None, count: int, jsonl: bool = False) -> Path:
    """``count`` samples whose ``media`` (``video``/``image``/None) is ``{prefix}{i}`` with the file's stem as
    prefix, so every sample is recognisable after the draw."""
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(count):
        sample = {"id": f"{path.stem}-{i}", "conversations": QA}
        if media:
            sample[media] = f"{path.stem}_{i}.{'mp4' if media == 'video' else 'png'}"
        samples.append(sample)
    path.write_text("".join(json.dumps(s) + "\n" for s in samples) if jsonl else json.dumps(samples))
    return path


@pytest.fixture
def three_sources(tmp_path) -> Path:
    """clips (8 videos, JSON), stills (2 images, JSONL), chat (5 text samples); each with its own folders."""
    _annotations(tmp_path / "ann" / "clips.json", "video", 8)
    _annotations(tmp_path / "ann" / "stills.jsonl", "image", 2, jsonl=True)
    _annotations(tmp_path / "ann" / "chat.json", None, 5)
    for folder in ("media/clips", "media/stills"):
        (tmp_path / folder).mkdir(parents=True)
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(
        "seed: 7\n"
        "sources:\n"
        "  - annotation: ann/clips.json\n"
        "    video_folder: media/clips\n"
        "    ratio: 0.5\n"
        "  - name: stills\n"
        "    annotation: ann/stills.jsonl\n"
        "    image_folder: media/stills\n"
        "    percent: 250\n"
        "  - annotation: ann/chat.json\n"
        "    count: 3\n"
    )
    return mixture


def _ids(samples: list[dict]) -> Counter:
    return Counter(s["id"] for s in samples)


def test_each_source_contributes_its_amount_taken_or_repeated(three_sources):
    samples, sources = load_mixture(three_sources)
    assert [(s.name, s.available, s.selected) for s in sources] == [("clips", 8, 4), ("stills", 2, 5), ("chat", 5, 3)]
    ids = _ids(samples)
    clips = {k: n for k, n in ids.items() if k.startswith("clips")}
    assert len(clips) == 4 and set(clips.values()) == {1}  # half of them, each once
    assert sorted(n for k, n in ids.items() if k.startswith("stills")) == [2, 3]  # both twice, one once more
    chat = {k: n for k, n in ids.items() if k.startswith("chat")}
    assert len(chat) == 3 and set(chat.values()) == {1}
    assert len(samples) == 12


def test_draws_follow_the_seed_and_one_source_does_not_move_the_others(three_sources, tmp_path):
    first, _ = load_mixture(three_sources)
    again, _ = load_mixture(three_sources)
    assert [s["id"] for s in first] == [s["id"] for s in again]
    text = three_sources.read_text()
    three_sources.write_text(text.replace("seed: 7", "seed: 8"))
    reseeded, _ = load_mixture(three_sources)
    assert _ids(reseeded) != _ids(first)
    # another amount for the chat source leaves the clips' draw as it was
    three_sources.write_text(text.replace("count: 3", "count: 4"))
    changed, _ = load_mixture(three_sources)
    clips = [s["id"] for s in first if s["id"].startswith("clips")]
    assert [s["id"] for s in changed if s["id"].startswith("clips")] == clips
    # without a seed in the file, the trainer's seed decides
    three_sources.write_text(text.replace("seed: 7\n", ""))
    assert _ids(load_mixture(three_sources, seed=7)[0]) == _ids(first)


def test_paths_resolve_against_each_sources_own_folders(three_sources, tmp_path):
    (tmp_path / "cli_videos").mkdir()
    (tmp_path / "cli_images").mkdir()
    text = three_sources.read_text() + (
        "  - name: old_style\n"  # only an image folder: its videos resolve against it, as on the command line
        "    annotation: ann/old_style.json\n"
        "    image_folder: media/stills\n"
        "  - name: inherits\n"  # no folder: the command line's
        "    annotation: ann/inherits.json\n"
    )
    three_sources.write_text(text)
    _annotations(tmp_path / "ann" / "old_style.json", "video", 1)
    _annotations(tmp_path / "ann" / "inherits.json", "image", 1)
    samples, _ = load_mixture(three_sources, video_folder=str(tmp_path / "cli_videos"),
                              image_folder=str(tmp_path / "cli_images"))
    by_id = {s["id"]: s for s in samples}
    clip = next(s for k, s in by_id.items() if k.startswith("clips"))
    assert Path(clip["video"]).parent == tmp_path / "media" / "clips"
    assert Path(by_id["stills-0"]["image"]).parent == tmp_path / "media" / "stills"
    assert Path(by_id["old_style-0"]["video"]) == tmp_path / "media" / "stills" / "old_style_0.mp4"
    assert Path(by_id["inherits-0"]["image"]) == tmp_path / "cli_images" / "inherits_0.png"


def test_start_up_logs_every_sources_sample_count(three_sources, caplog):
    caplog.set_level(logging.INFO, logger="llava.train.data")
    load_mixture(three_sources)
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "3 sources, 12 samples (seed 7)" in log
    assert "clips: 4 of 8 samples (ratio 0.5: drawn at random)" in log
    assert "stills: 5 of 2 samples (percent 250: every sample 2x, 1 drawn at random once more)" in log
    assert "chat: 3 of 5 samples (count 3: drawn at random)" in log


def test_a_missing_annotation_file_names_the_source_and_its_line(three_sources):
    three_sources.write_text(three_sources.read_text().replace("ann/chat.json", "ann/gone.json"))
    with pytest.raises(MixtureError, match=r"mix\.yaml: source 3 'gone' \(line 10\): annotation file '.*gone\.json' "
                                           r"does not exist"):
        load_mixture(three_sources)


def test_a_malformed_sample_names_the_source_and_the_annotation_line(three_sources, tmp_path):
    lines = (tmp_path / "ann" / "stills.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"image": "x.png", "conversations": [{"from": "gpt", "value": "no question"}]})
    (tmp_path / "ann" / "stills.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(MixtureError, match=r"source 2 'stills' \(line 6\): .*stills\.jsonl: line 2: "
                                           r"conversations\[0\]\.from: expected 'human'"):
        load_mixture(three_sources)


@pytest.mark.parametrize(
    "entry, message",
    [
        ("  - name: extra\n    annotation: ann/chat.json\n    count: 0\n", r"count must be a positive integer, got 0"),
        ("  - name: extra\n    annotation: ann/chat.json\n    ratio: 0.5\n    count: 2\n", r"give one of ratio, percent, count, not ratio and count"),
        ("  - name: extra\n    annotation: ann/chat.json\n    ratio: -1\n", r"ratio must be a positive number"),
        ("  - name: extra\n    annotation: ann/chat.json\n    ratio: 0.01\n", r"ratio 0.01 of 5 samples selects none"),
        ("  - name: extra\n    annotation: ann/chat.json\n    weight: 2\n", r"unknown key\(s\) 'weight'"),
        ("  - video_folder: media/clips\n", r"'annotation' \(the source's JSON or JSONL file\) is missing"),
        ("  - name: extra\n    annotation: ann/chat.json\n    video_folder: media/nowhere\n", r"video_folder '.*nowhere' is not a directory"),
        ("  - annotation: ann/clips.json\n", r"the name is already used by source 1 \(line 3\)"),
    ],
)
def test_a_malformed_source_fails_at_start_up_naming_it_and_its_line(three_sources, entry, message):
    three_sources.write_text(three_sources.read_text() + entry)
    with pytest.raises(MixtureError, match=r"mix\.yaml: source 4 .*\(line 12\): " + message):
        load_mixture(three_sources)


def test_a_json_mixture_file_works_like_yaml_and_reports_lines_too(three_sources, tmp_path):
    mixture = {
        "seed": 7,
        "sources": [
            {"annotation": "ann/clips.json", "video_folder": "media/clips", "ratio": 0.5},
            {"name": "stills", "annotation": "ann/stills.jsonl", "image_folder": "media/stills", "percent": 250},
            {"annotation": "ann/chat.json", "count": 3},
        ],
    }
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(mixture, indent=2))
    assert is_mixture_file(path)
    assert [s["id"] for s in load_mixture(path)[0]] == [s["id"] for s in load_mixture(three_sources)[0]]
    mixture["sources"][2]["count"] = 2.5
    path.write_text(json.dumps(mixture, indent=2))
    with pytest.raises(MixtureError, match=r"source 3 'chat' \(line 15\): count must be a positive integer"):
        load_mixture(path)


def test_annotation_files_are_not_taken_for_mixtures(tmp_path):
    jsonl_named_json = _annotations(tmp_path / "a.json", "video", 3, jsonl=True)  # JSON Lines starting with '{'
    listed = _annotations(tmp_path / "b.json", "video", 3)
    assert not is_mixture_file(jsonl_named_json) and not is_mixture_file(listed)
    samples, sources = load_training_samples(str(jsonl_named_json), DataArguments(data_path=str(jsonl_named_json)))
    assert len(samples) == 3 and [(s.name, s.selected) for s in sources] == [("a", 3)]


def test_the_training_dataset_reads_a_mixture(three_sources):
    from llava.model import LlavaQwenSlowFastConfig
    from llava.model.tokenizer_utils import train_tiny_tokenizer
    from llava.model.vision_tower import build_image_processor

    config = LlavaQwenSlowFastConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tokenizer_model_max_length=512,
        mm_vision_tower_overrides={"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "image_size": 64},
    )
    args = DataArguments(data_path=str(three_sources))
    dataset = LazySupervisedDataset(str(three_sources), train_tiny_tokenizer(), build_image_processor(64), args, config)
    assert len(dataset) == 12 and [s.selected for s in dataset.sources] == [4, 5, 3]
    assert sorted(dataset.modality_of(i) for i in range(len(dataset))) == ["image"] * 5 + ["text"] * 3 + ["video"] * 4
