"""Which visual path does a trained model read? Per-family accuracy with the fast tokens intact or scrambled.

    python -m playground.probe_visual_paths --model-path assets/tiny-slowfast --data DATA [--split val]
        [--videos 200] [--modes intact "fast shuffled" "fast averaged"]

The first answer token of every question is scored teacher-forced (the argmax after the prompt and the
video), three times: with the fast tokens as they are; with the fast tokens of each video shuffled (their
content kept, their order -- where and when each came from -- lost); and with every fast token replaced by
the video's mean fast token (only the average content left). The slow tokens are never touched. A family
whose accuracy does not move when the fast tokens are scrambled is answered from the slow path.

The mean cross-entropy of that token is reported too. On the training split it tells a family the model has
not fitted (a loss of ln K for K answers: a uniform guess among them) from one it has over-fitted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from llava.model.slow_fast import SlowFastTokens
from llava.train.data import DataArguments, make_supervised_data_module
from playground.evaluate_synthetic import FAMILY_ANSWERS, question_family

MODES: tuple[str, ...] = ("intact", "fast shuffled", "fast averaged")


def scramble_fast(tokens: SlowFastTokens, mode: str, generator: torch.Generator) -> SlowFastTokens:
    """``tokens`` with its fast tokens ``[F, C]`` shuffled or replaced by their mean (``mode``); slow kept."""
    if mode == "intact":
        return tokens
    if mode == "fast shuffled":
        order = torch.randperm(tokens.fast.shape[0], generator=generator).to(tokens.fast.device)
        return SlowFastTokens(fast=tokens.fast[order], slow=tokens.slow)
    if mode == "fast averaged":
        return SlowFastTokens(fast=tokens.fast.mean(0, keepdim=True).expand_as(tokens.fast).clone(), slow=tokens.slow)
    raise ValueError(f"mode {mode!r}: use one of {MODES}")


@torch.no_grad()
def probe(
    model_path: str, data_dir: str, split: str = "val", videos: int = 200, batch: int = 25, seed: int = 0,
    modes: tuple[str, ...] = MODES,
) -> dict[str, Any]:
    """Teacher-forced first-answer-token accuracy (%) and mean cross-entropy (nats) per family and mode over
    the split's first ``videos``."""
    if not modes or any(m not in MODES for m in modes):
        raise ValueError(f"modes {list(modes)}: choose from {MODES}")
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(model_path, device="cpu", torch_dtype="float32")
    model.eval()
    args = DataArguments(data_path=str(Path(data_dir) / f"{split}.json"), video_folder=str(data_dir),
                         video_frames=model.config.video_frames, fps=0)  # fmt: skip
    dataset = make_supervised_data_module(tokenizer, processor, args, model.config, max_length=512)
    items, collate = dataset["train_dataset"], dataset["data_collator"]
    records = json.loads((Path(data_dir) / f"{split}.json").read_text())
    chosen = [i for i, r in enumerate(records) if "video" in r][:videos]
    if not chosen:
        raise ValueError(f"{data_dir}/{split}.json has no video samples")
    # template tokens are supervised too: an answer starts at the first supervised token that is not one of them
    template = {tokenizer.convert_tokens_to_ids("<|im_start|>"), tokenizer.convert_tokens_to_ids("<|im_end|>"),
                *tokenizer("\n")["input_ids"]}  # fmt: skip

    encode = model.encode_images
    hits: dict[str, dict[str, list[int]]] = {mode: defaultdict(list) for mode in modes}
    losses: dict[str, dict[str, list[float]]] = {mode: defaultdict(list) for mode in modes}
    for mode in modes:
        generator = torch.Generator().manual_seed(seed)
        model.encode_images = lambda images, mode=mode, g=generator: [scramble_fast(t, mode, g) for t in encode(images)]
        try:
            for start in range(0, len(chosen), batch):
                part = chosen[start : start + batch]
                inputs = collate([items[i] for i in part])
                inputs.pop("modalities", None)
                labels = inputs.pop("labels")
                logits = model(**inputs).logits
                offset = logits.shape[1] - labels.shape[1]  # fast tokens replace one placeholder each
                for row, index in enumerate(part):
                    supervised = [p for p in (labels[row] != -100).nonzero()[:, 0].tolist()
                                  if int(labels[row, p]) not in template]  # fmt: skip
                    starts = [p for k, p in enumerate(supervised) if k == 0 or supervised[k - 1] != p - 1]
                    turns = records[index]["conversations"][0::2]
                    for turn, pos in zip(turns, starts, strict=True):
                        family = question_family(turn["value"].replace("<image>", "").strip())
                        scores, target = logits[row, pos - 1 + offset], labels[row, pos]
                        hits[mode][family].append(int(scores.argmax() == target))
                        losses[mode][family].append(torch.nn.functional.cross_entropy(scores, target).item())
        finally:
            model.encode_images = encode
    families = [f for f in FAMILY_ANSWERS if f in hits[modes[0]]]
    return {
        "model": model_path, "split": split, "videos": len(chosen), "modes": list(modes),
        "questions": {f: len(hits[modes[0]][f]) for f in families},
        "accuracy": {mode: {f: 100 * sum(hits[mode][f]) / len(hits[mode][f]) for f in families} for mode in modes},
        "loss": {mode: {f: sum(losses[mode][f]) / len(losses[mode][f]) for f in families} for mode in modes},
        "uniform_loss": {f: math.log(len(FAMILY_ANSWERS[f])) for f in families},
    }  # fmt: skip


def format_table(result: dict[str, Any], metric: str = "accuracy") -> str:
    """A markdown table, a row per mode and a column per family, of ``metric`` (``accuracy`` or ``loss``);
    the loss table ends with a row of the uniform guess's loss, ln(number of answers)."""
    if metric not in ("accuracy", "loss"):
        raise ValueError(f"metric {metric!r}: use 'accuracy' or 'loss'")
    families = list(result["questions"])
    cell = (lambda v: f"{v:.1f} %") if metric == "accuracy" else (lambda v: f"{v:.3f}")
    lines = [f"| fast tokens ({metric}) | " + " | ".join(f"{f.removeprefix('video_')} ({result['questions'][f]})" for f in families) + " |",
             "|" + " --- |" * (len(families) + 1)]  # fmt: skip
    for mode in result["modes"]:
        lines.append(f"| {mode} | " + " | ".join(cell(result[metric][mode][f]) for f in families) + " |")
    if metric == "loss":
        lines.append("| uniform guess | " + " | ".join(cell(result["uniform_loss"][f]) for f in families) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m playground.probe_visual_paths", description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--data", required=True, help="dataset root written by playground.synthetic_data")
    parser.add_argument("--split", default="val")
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffles")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="which fast-token treatments to score")
    args = parser.parse_args(argv)
    if not (Path(args.data) / f"{args.split}.json").is_file():
        parser.error(f"--data {args.data}: no {args.split}.json there")
    result = probe(args.model_path, args.data, args.split, args.videos, seed=args.seed, modes=tuple(args.modes))
    print(format_table(result), end="")
    print(format_table(result, "loss"), end="")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
