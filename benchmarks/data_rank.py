"""What one training rank of the data benchmark runs, in its own process: build the training set, plan the order,
start the DataLoader's workers and let each load samples, then report its process ids and wait to be measured.

``python -m benchmarks.data_rank '{"loader": "store" | "today", ...}'`` (see :func:`main`); also the synthetic
annotation files and the tokenizer the benchmark uses, and "today's loader": the training set of commit 40b444f
(every sample a Python dict in every process, the lengths estimated by one tokenizer call over every turn)
reproduced here, since the package no longer has it.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SYNTHETIC_FORMAT = 1
# Words the tokenizer is trained on, so that a word is about one token (as English is for Qwen2's tokenizer).
WORDS = (
    "the a of in on at to and with what where when which who how many is are was video image clip frame person man "
    "woman child dog cat car bird ball table chair door window tree house road phone cup book bike horse boat kitchen "
    "room red green blue yellow black white orange purple pink brown gray circle square triangle star line cube box "
    "moving running walking jumping sitting standing talking eating holding opening closing turning falling rolling "
    "cooking playing reading writing left right up down forward backward toward camera away around first then after "
    "before during while scene shows describe detail happens next one two three four five six seven eight nine ten "
    "answer question because there this that these those it they he she his her its their from into over under"
).split()
# The mix (after LLaVA-Video SFT): share, words in the question, words in the answer (uniform ranges).
MIX = {
    "video": (0.6, (10, 60), (10, 340)),  # 20-400 text words around a 64-frame video
    "image": (0.2, (10, 60), (10, 140)),
    "text": (0.2, (20, 300), (30, 1200)),  # 50-1,500 words, text only
}


def tokenizer_dir(cache: Path) -> Path:
    """A tiny byte-level BPE (Qwen2's special tokens) trained on :data:`WORDS`, saved once under ``cache``."""
    from llava.model.tokenizer_utils import train_tiny_tokenizer

    folder = cache / f"tokenizer-v{SYNTHETIC_FORMAT}"
    if not (folder / "tokenizer_config.json").exists():
        corpus = [" ".join(WORDS[k:] + WORDS[:k]) for k in range(len(WORDS))] * 4
        train_tiny_tokenizer(vocab_size=2048, extra_texts=corpus).save_pretrained(str(folder))
    return folder


def write_annotations(path: Path, count: int, seed: int = 0) -> Path:
    """``count`` samples of :data:`MIX` as a JSON list (the format of LLaVA-Video's files), written once."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    kinds = list(MIX)
    kind = rng.choice(len(kinds), size=count, p=[MIX[k][0] for k in kinds])
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as out:
        out.write("[")
        for start in range(0, count, 10_000):
            parts = []
            for i in range(start, min(count, start + 10_000)):
                name = kinds[kind[i]]
                _, question, answer = MIX[name]
                q = " ".join(words[rng.integers(0, len(words), rng.integers(*question))])
                a = " ".join(words[rng.integers(0, len(words), rng.integers(*answer))])
                sample: dict[str, Any] = {"id": i}
                if name != "text":
                    sample[name] = f"{name}s/{i:07d}.{'mp4' if name == 'video' else 'jpg'}"
                    q = "<image>\n" + q
                sample["conversations"] = [{"from": "human", "value": q + "?"}, {"from": "gpt", "value": a + "."}]
                parts.append(json.dumps(sample))
            out.write((",\n" if start else "\n") + ",\n".join(parts))
        out.write("\n]\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------- today's loader


class TodaysDataset:
    """The training set of commit 40b444f, reduced to what costs memory: the whole file parsed into dicts, every
    sample validated, lengths from one tokenizer call over every turn (its encodings all kept until summed);
    ``__getitem__`` tokenises a sample as the current dataset does (text only here)."""

    def __init__(self, path: str, tokenizer: Any, max_length: int) -> None:
        from llava.train.annotations import sample_problem

        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
        self.samples = json.loads(text)
        del text
        for index, sample in enumerate(self.samples):
            problem = sample_problem(sample)
            if problem:
                raise ValueError(f"{path}: index {index}: {problem}")
        self.tokenizer, self.max_length = tokenizer, max_length

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def modality_lengths(self) -> list[int]:
        from llava.train.template import _remove_markers

        values = [_remove_markers(t["value"]) if "<image>" in t["value"] else t["value"]
                  for s in self.samples for t in s["conversations"]]
        counts = iter(len(ids) for ids in self.tokenizer(values, add_special_tokens=False)["input_ids"])
        return [-min(sum(next(counts) for _ in s["conversations"]) + 30, self.max_length) for s in self.samples]

    def __getitem__(self, index: int) -> dict:
        from llava.train.template import preprocess_qwen, truncate_to_budget

        ids, labels = preprocess_qwen(self.samples[index]["conversations"], self.tokenizer, has_visual=False)
        ids, labels = truncate_to_budget(ids, labels, self.max_length, 0)
        return {"input_ids": ids, "labels": labels, "pixel_values": None}


class _CollectOnce:
    """Runs one full garbage collection in each process after it has loaded ``after`` samples, as the workers of a
    long run eventually do (a collection in a forked worker writes to every object it inherited)."""

    def __init__(self, dataset: Any, after: int) -> None:
        self.dataset, self.after, self.loaded = dataset, after, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        self.loaded += 1
        if self.loaded == self.after:
            gc.collect()
        return item


# --------------------------------------------------------------------------------------------- one rank


def main(spec: dict) -> None:
    """Build the training set as a trainer rank does, start ``workers`` DataLoader workers, load
    ``samples_per_worker`` samples in each, print ``{"pid", "workers", "startup_s"}`` and wait for stdin to close.

    ``spec``: ``loader`` ("store", "store_without_freeze" or "today"), ``data``, ``cache``, ``tokenizer``, ``workers``, ``samples_per_worker``,
    ``max_length``, ``rank``, ``world_size``.
    """
    import torch
    from transformers import AutoTokenizer

    from llava.model import LlavaQwenSlowFastConfig
    from llava.model.vision_tower import build_image_processor
    from llava.train.collators import DataCollatorForSupervisedDataset
    from llava.train.sampling import LengthGroupedSampler

    torch.set_num_threads(1)
    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    if spec["loader"].startswith("store"):
        from llava.train.data import DataArguments, LazySupervisedDataset
        from llava.train.loader import freeze_before_fork

        config = LlavaQwenSlowFastConfig(
            vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, tokenizer_model_max_length=spec["max_length"],
            mm_vision_tower_overrides={"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "image_size": 64},
        )
        args = DataArguments(data_path=spec["data"], is_multimodal=False, data_cache_dir=spec["cache"])
        dataset = LazySupervisedDataset(spec["data"], tokenizer, build_image_processor(64), args, config)
    else:
        dataset = TodaysDataset(spec["data"], tokenizer, spec["max_length"])
    lengths = dataset.modality_lengths
    startup = time.monotonic() - started
    # the SFT recipe's order: length-grouped by modality, 1 sample x 2 accumulation steps per rank
    sampler = LengthGroupedSampler(2, spec["world_size"], lengths, seed=0)
    del lengths
    if spec["loader"] == "store" and spec["workers"]:
        freeze_before_fork()  # what SlowFastTrainer.get_train_dataloader does
    workers = spec["workers"]
    loader = torch.utils.data.DataLoader(
        _CollectOnce(dataset, spec["samples_per_worker"]), batch_size=1, sampler=sampler, num_workers=workers,
        collate_fn=DataCollatorForSupervisedDataset(tokenizer), persistent_workers=bool(workers),
    )
    iterator = iter(loader)
    for _ in range(spec["samples_per_worker"] * max(workers, 1)):
        next(iterator)
    pids = [w.pid for w in getattr(iterator, "_workers", [])]
    print(json.dumps({"pid": os.getpid(), "workers": pids, "startup_s": startup}), flush=True)
    sys.stdin.read()  # measured by the parent meanwhile; it closes our stdin when done
    del iterator


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
