"""The annotation store (llava.train.store), the streaming readers (llava.train.annotations) and the lengths
(llava.train.lengths): built once per data version under concurrency, never trusted half-built, keyed by content,
samples materialised on access, lengths exact and computed once."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from llava.model import LlavaQwenSlowFastConfig
from llava.model.tokenizer_utils import train_tiny_tokenizer
from llava.model.vision_tower import build_image_processor
from llava.train import annotations, lengths, store
from llava.train.annotations import AnnotationError, iter_annotations, load_annotations
from llava.train.data import DataArguments, LazySupervisedDataset, preprocess_qwen
from llava.train.mixture import load_mixture, open_mixture
from llava.train.samples import TrainingSamples
from llava.train.store import open_annotation_store

QA = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A shape."}]


def _samples(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        sample = {"id": i, "conversations": [
            {"from": "human", "value": "Q" + " word" * int(rng.integers(0, 30)) + (" \u2028 é" if i % 5 == 0 else "")},
            {"from": "gpt", "value": "A" + " answer" * int(rng.integers(1, 40))},
        ]}
        if i % 3 == 0:
            sample["video"] = f"v/{i}.mp4"
        elif i % 3 == 1:
            sample["image"] = f"i/{i}.png"
        out.append(sample)
    return out


def _write(path: Path, samples: list[dict], jsonl: bool = False, indent: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(s) + "\n" for s in samples) if jsonl else json.dumps(samples, indent=indent)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# ----------------------------------------------------------------------------- streaming readers


@pytest.mark.parametrize("jsonl", [False, True], ids=["json-list", "jsonl"])
def test_streamed_samples_equal_the_whole_file_parsed_at_once(tmp_path, monkeypatch, jsonl):
    monkeypatch.setattr(annotations, "_CHUNK_BYTES", 13)  # elements and lines straddle many chunk boundaries
    samples = _samples(40)
    path = _write(tmp_path / ("a.jsonl" if jsonl else "a.json"), samples, jsonl=jsonl, indent=None if jsonl else 2)
    streamed = list(iter_annotations(path))
    assert [r.sample for r in streamed] == samples
    assert [r.where for r in streamed[:2]] == (["line 1", "line 2"] if jsonl else ["index 0", "index 1"])


@pytest.mark.parametrize(
    "text",
    [
        '[\n  {"conversations": []},\n  {"conversations": [}\n]\n',
        '[{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},\n]',
        '[{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}] x',
        '[{"conversations": [{"from": "human", "value": "unterminated}]',
        '[{"conversations": 1} {"conversations": 2}]',
    ],
    ids=["bad-value", "trailing-comma", "extra-data", "unterminated", "missing-comma"],
)
def test_a_syntax_error_names_the_line_and_column_json_would(tmp_path, monkeypatch, text):
    monkeypatch.setattr(annotations, "_CHUNK_BYTES", 5)
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    path = tmp_path / "a.json"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=rf"line {expected.value.lineno}, column {expected.value.colno}: "):
        load_annotations(path)


def test_a_file_that_is_not_utf8_names_the_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(annotations, "_CHUNK_BYTES", 4)
    path = tmp_path / "a.jsonl"
    path.write_bytes(json.dumps({"conversations": QA}).encode() + b"\n{\"x\": \"\xff\"}\n")
    offset = len(json.dumps({"conversations": QA})) + 1 + 7
    with pytest.raises(AnnotationError, match=rf"not UTF-8 text \(invalid start byte at byte {offset}\)"):
        load_annotations(path)


# ----------------------------------------------------------------------------- the store


def test_the_store_gives_the_samples_load_annotations_gives_one_at_a_time(tmp_path, cache):
    samples = _samples(25)
    path = _write(tmp_path / "a.json", samples)
    expected = load_annotations(path, video_folder="/videos", image_folder="/images")
    opened = open_annotation_store(path, video_folder="/videos", image_folder="/images", cache_dir=str(cache))
    assert len(opened) == 25
    for row, sample in enumerate(expected):
        sample.pop("id")
        assert opened.sample(row) == sample
    assert opened.where(7) == f"{path}: index 7"
    assert opened.modality.tolist()[:3] == [2, 1, 0]  # video, image, text
    assert isinstance(opened.modality, np.memmap)


def test_an_unchanged_file_reuses_its_store_and_an_edited_one_gets_a_new_one(tmp_path, cache, caplog):
    path = _write(tmp_path / "a.jsonl", _samples(10), jsonl=True)
    first = open_annotation_store(path, cache_dir=str(cache))
    built = os.stat(os.path.join(first.folder, "samples.arrow")).st_mtime_ns
    with caplog.at_level(logging.INFO, logger="llava.train.data"):
        again = open_annotation_store(path, cache_dir=str(cache))
    assert again.folder == first.folder and "annotation store of" not in caplog.text
    assert os.stat(os.path.join(first.folder, "samples.arrow")).st_mtime_ns == built
    _write(path, _samples(11), jsonl=True)
    edited = open_annotation_store(path, cache_dir=str(cache))
    assert edited.folder != first.folder and len(edited) == 11
    other_folders = open_annotation_store(path, video_folder=str(tmp_path), cache_dir=str(cache))
    assert other_folders.folder != edited.folder


def _open_slowly(path: str, cache: str, log: str, delay: float, half_written: bool = False) -> None:
    """In a child process: open the store with a build that takes ``delay`` seconds and records who built it
    (``half_written``: the build has written part of its files when it starts waiting)."""
    original = store._build_annotation_store

    def slow_build(tmp, *args):
        if half_written:
            os.makedirs(tmp)
            Path(tmp, "samples.arrow").write_bytes(b"half")
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(delay)
        original(tmp, *args)

    store._build_annotation_store = slow_build
    opened = open_annotation_store(path, cache_dir=cache)
    with open(log + ".opened", "a") as handle:
        handle.write(f"{opened.folder} {len(opened)}\n")


def test_concurrent_processes_build_the_store_once_and_all_open_it(tmp_path, cache):
    path = _write(tmp_path / "a.json", _samples(30))
    log = str(tmp_path / "builds.log")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_open_slowly, args=(str(path), str(cache), log, 1.0)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert len(Path(log).read_text().split()) == 1  # one builder; the others waited for the lock, then opened it
    opened = Path(log + ".opened").read_text().splitlines()
    assert len(opened) == 4 and len(set(opened)) == 1 and opened[0].endswith(" 30")


def test_a_build_killed_half_way_is_never_opened_and_is_cleaned_up(tmp_path, cache):
    path = _write(tmp_path / "a.json", _samples(30))
    log = str(tmp_path / "builds.log")
    context = multiprocessing.get_context("fork")
    doomed = context.Process(target=_open_slowly, args=(str(path), str(cache), log, 30.0, True))
    doomed.start()
    deadline = time.monotonic() + 30
    while not os.path.exists(log) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    leftovers = [p for p in cache.iterdir() if ".tmp-" in p.name]
    os.kill(doomed.pid, signal.SIGKILL)  # holds the lock and a half-written temporary folder
    doomed.join(10)
    assert leftovers and not any(p.name.startswith("annotations-") and p.is_dir() and ".tmp-" not in p.name
                                 for p in cache.iterdir())
    opened = open_annotation_store(path, cache_dir=str(cache))  # the lock died with its holder
    assert len(opened) == 30 and ".tmp-" not in opened.folder
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]


def test_a_damaged_store_is_rebuilt(tmp_path, cache):
    path = _write(tmp_path / "a.json", _samples(12))
    first = open_annotation_store(path, cache_dir=str(cache))
    with open(os.path.join(first.folder, "samples.arrow"), "r+b") as handle:
        handle.truncate(100)
    rebuilt = open_annotation_store(path, cache_dir=str(cache))
    assert rebuilt.folder == first.folder and len(rebuilt) == 12 and rebuilt.sample(3)["conversations"]


def test_an_annotation_error_is_found_once_and_reported_to_every_process(tmp_path, cache, monkeypatch):
    samples = _samples(6)
    samples[4]["conversations"] = [{"from": "gpt", "value": "no question"}]
    path = _write(tmp_path / "a.jsonl", samples, jsonl=True)
    message = r"a\.jsonl: line 5: conversations\[0\]\.from: expected 'human'"
    with pytest.raises(AnnotationError, match=message):
        open_annotation_store(path, cache_dir=str(cache))
    monkeypatch.setattr(store, "iter_annotations", lambda *a, **k: pytest.fail("the file was read again"))
    with pytest.raises(AnnotationError, match=message):
        open_annotation_store(path, cache_dir=str(cache))


def test_a_store_reopens_by_its_folder_in_a_spawned_worker(tmp_path, cache):
    path = _write(tmp_path / "a.json", _samples(5))
    opened = open_annotation_store(path, cache_dir=str(cache))
    copy = pickle.loads(pickle.dumps(opened))
    assert copy.folder == opened.folder and copy.sample(2) == opened.sample(2)
    assert len(pickle.dumps(opened)) < 1000  # the folder, not the samples


def test_a_mixture_reads_the_same_samples_from_its_stores(tmp_path, cache):
    _write(tmp_path / "ann" / "a.json", _samples(8, seed=1))
    _write(tmp_path / "ann" / "b.jsonl", _samples(3, seed=2), jsonl=True)
    (tmp_path / "media").mkdir()
    mixture = tmp_path / "mix.yaml"
    mixture.write_text("seed: 3\nsources:\n  - annotation: ann/a.json\n    ratio: 0.5\n"
                       "  - annotation: ann/b.jsonl\n    video_folder: media\n    percent: 250\n")
    listed, _ = load_mixture(mixture)
    stored, summaries = open_mixture(mixture, cache_dir=str(cache))
    assert isinstance(stored, TrainingSamples) and isinstance(stored.index, np.memmap)
    assert [s.selected for s in summaries] == [4, 8] and len(stored) == 12
    for i, sample in enumerate(listed):
        assert stored[i] == {key: value for key, value in sample.items() if key != "id"}
    assert stored.where(11).startswith(str(tmp_path / "ann" / "b.jsonl"))


# ----------------------------------------------------------------------------- lengths


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


def _config() -> LlavaQwenSlowFastConfig:
    return LlavaQwenSlowFastConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, tokenizer_model_max_length=512, min_fast_frames=1,
        mm_vision_tower_overrides={"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "image_size": 64},
    )


TRICKY = [
    {"video": "a.mp4", "conversations": [{"from": "human", "value": "Before\n<image>\nafter"}, {"from": "gpt", "value": "x"}]},
    {"video": "b.mp4", "conversations": [{"from": "system", "value": "Be brief."}, *QA]},
    {"image": "c.png", "conversations": QA + [{"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]},
    {"conversations": [{"from": "human", "value": "<image> stray marker"}, {"from": "gpt", "value": "ok"}]},
]


@pytest.mark.parametrize("is_multimodal", [True, False])
def test_text_lengths_are_the_ids_preprocess_makes(tmp_path, cache, tokenizer, is_multimodal):
    path = _write(tmp_path / "a.json", TRICKY + _samples(20))
    opened = open_annotation_store(path, cache_dir=str(cache))
    counts = lengths.store_text_ids(opened, tokenizer, is_multimodal=is_multimodal)
    for row in range(len(opened)):
        sample = opened.sample(row)
        visual = is_multimodal and ("video" in sample or "image" in sample)
        ids, _ = preprocess_qwen(sample["conversations"], tokenizer, has_visual=visual)
        assert counts[row] == len(ids), row


def test_text_lengths_are_computed_once_in_bounded_chunks(tmp_path, cache, tokenizer, monkeypatch):
    monkeypatch.setattr(lengths, "_CHUNK_ROWS", 7)
    calls = []
    original = lengths.count_prompt_ids
    monkeypatch.setattr(lengths, "count_prompt_ids", lambda conv, *a: calls.append(len(conv)) or original(conv, *a))
    opened = open_annotation_store(_write(tmp_path / "a.json", _samples(30)), cache_dir=str(cache))
    first = np.array(lengths.store_text_ids(opened, tokenizer))
    assert calls == [7, 7, 7, 7, 2]
    again = lengths.store_text_ids(opened, tokenizer)
    assert len(calls) == 5 and isinstance(again, np.memmap) and (again == first).all()
    other = train_tiny_tokenizer(vocab_size=400)
    lengths.store_text_ids(opened, other)
    assert len(calls) == 10  # another tokenizer: counted again, kept beside the first


def test_dataset_lengths_count_the_fast_and_slow_tokens_of_the_configured_frames(tmp_path, tokenizer):
    samples = TRICKY[:3] + [{"conversations": QA}]
    path = _write(tmp_path / "a.json", samples)
    args = DataArguments(data_path=str(path), video_frames=8)
    dataset = LazySupervisedDataset(str(path), tokenizer, build_image_processor(64), args, _config())
    sizes = dataset.sample_lengths
    text = [len(preprocess_qwen(s["conversations"], tokenizer, has_visual="video" in s or "image" in s)[0]) for s in samples]
    # 64 px: a 2x2 grid; video pooling 2 -> 1 token a frame, 8 frames pooled 4x in time -> 2 fast, 8 slow
    assert sizes.positions.tolist() == [text[0] + 1, text[1] + 1, text[2] + 3, text[3]]
    assert sizes.slow.tolist() == [8, 8, 4, 0] and sizes.visual.tolist() == [True, True, True, False]
    assert dataset.modality_lengths.tolist() == [text[0] + 1, text[1] + 1, text[2] + 3, -text[3]]


def test_a_store_another_host_finished_first_is_kept_and_ours_discarded(tmp_path):
    # the lock is per host: on a shared file system another node may rename its complete build in first
    final = str(tmp_path / "annotations-x")

    def build(tmp: str, marker: str) -> None:
        os.makedirs(tmp)
        Path(tmp, "data").write_text(marker)
        store.write_manifest(tmp, {})

    def racing_build(tmp: str) -> None:
        build(final, "theirs")  # the other host's store appears while ours is being written
        build(tmp, "ours")

    assert store.publish(final, racing_build, "test") == final
    assert Path(final, "data").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotations-x", "annotations-x.lock"]


def test_a_skipped_sample_is_logged_with_its_annotation_file_and_line(tmp_path, tokenizer, caplog):
    samples = [{"conversations": QA}, {"video": str(tmp_path / "gone.mp4"), "conversations": QA}, {"conversations": QA}]
    path = _write(tmp_path / "a.jsonl", samples, jsonl=True)
    dataset = LazySupervisedDataset(str(path), tokenizer, build_image_processor(64), DataArguments(data_path=str(path)),
                                    _config())
    with caplog.at_level(logging.WARNING, logger="llava.train.data"):
        assert dataset[1]["index"] == 2
    assert f"skipping sample index 1 (video '{tmp_path / 'gone.mp4'}', {path}: line 2)" in caplog.text
