"""Pretrain a tiny ConvNeXt tower on synthetic frames: the stand-in for the released model's CLIP tower.

    python -m playground.pretrain_tower --out tower.safetensors [--image-size 64] [--dims 16,32,48,64]
        [--depths 1,1,1,1] [--output-stride 8] [--steps 600] [--batch-size 32] [--seed 0]

The released model starts from a vision tower that already sees (CLIP ConvNeXt-XXL). A tower trained from
scratch only through a language model's answers gets almost no signal: at initialisation its features barely
change with the image, so the language model learns the answers' priors and never the pixels. This
script gives the tiny tower what CLIP gives the big one, cheaply: dense supervision from the generator's
ground truth. For every cell of the tower's output grid a linear head predicts which colours (red, green,
blue, yellow, white) and which shapes (square, circle, triangle) cover part of it, with binary
cross-entropy, on freshly rendered frames of random scenes (never the QA splits' videos). The head is
thrown away; the tower is written in timm's layout, which ``--vision_tower_pretrained`` and
:meth:`LlavaQwenSlowFastForCausalLM.load_vision_tower_weights` read.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.convnext import ConvNeXt

from llava.model.vision_tower import build_image_processor
from playground.synthetic_data import COLORS, SHAPES, render_scene, sample_scene, shape_mask

NUM_LABELS = len(COLORS) + len(SHAPES)


def label_maps(spec) -> np.ndarray:
    """Per pixel and frame, which colours and shapes cover it: ``bool [frames, size, size, 5 + 3]``."""
    colors, shapes = list(COLORS), list(SHAPES)
    labels = np.zeros((spec.frames, spec.size, spec.size, NUM_LABELS), dtype=bool)
    for shape in spec.shapes:
        mask = shape_mask(shape.shape, shape.size)
        for t in range(shape.appear, spec.frames):
            x, y = shape.position(t)
            cell = labels[t, y : y + shape.size, x : x + shape.size]
            cell[mask, colors.index(shape.color)] = True
            cell[mask, len(colors) + shapes.index(shape.shape)] = True
    if spec.flash is not None:
        f = spec.flash
        labels[f.frame, f.y : f.y + f.size, f.x : f.x + f.size, colors.index(f.color)] = True
    return labels


def cell_targets(labels: np.ndarray, grid: int) -> np.ndarray:
    """``[frames, size, size, L]`` pixel labels -> ``float [frames, grid*grid, L]``: 1 where any pixel of the
    cell has the label."""
    frames, size, _, num = labels.shape
    cell = size // grid
    pooled = labels.reshape(frames, grid, cell, grid, cell, num).any(axis=(2, 4))
    return pooled.reshape(frames, grid * grid, num).astype(np.float32)


def sample_batch(rng: np.random.Generator, processor: Any, size: int, grid: int, frames_per_scene: int, scenes: int):
    """Frames ``[scenes * frames_per_scene, 3, size, size]`` and their cell targets."""
    pixels, targets = [], []
    for _ in range(scenes):
        spec = sample_scene(rng, size, frames_per_scene, flash=bool(rng.random() < 0.5))
        video = render_scene(spec)
        pixels.append(processor.preprocess(list(video), return_tensors="pt")["pixel_values"])
        targets.append(torch.from_numpy(cell_targets(label_maps(spec), grid)))
    return torch.cat(pixels), torch.cat(targets)


class TowerWithHead(torch.nn.Module):
    """ConvNeXt features ``[N, C, g, g]`` -> per-cell label logits ``[N, g*g, 8]``."""

    def __init__(self, depths: list[int], dims: list[int], output_stride: int) -> None:
        super().__init__()
        self.tower = ConvNeXt(depths=depths, dims=dims, num_classes=0, norm_eps=1e-5, output_stride=output_stride)
        self.head = torch.nn.Linear(dims[-1], NUM_LABELS)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.tower.forward_features(pixels).flatten(2).transpose(1, 2)
        return self.head(features)


def pretrain_tower(
    out: str | Path,
    image_size: int = 64,
    depths: list[int] | None = None,
    dims: list[int] | None = None,
    output_stride: int = 8,
    steps: int = 600,
    scenes_per_step: int = 8,
    frames_per_scene: int = 4,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: int = 50,
) -> dict[str, Any]:
    """Train, write the tower's weights (timm layout, safetensors) to ``out``, and return a summary."""
    from safetensors.torch import save_file

    depths, dims = depths or [1, 1, 1, 1], dims or [16, 32, 48, 64]
    if image_size % output_stride:
        raise ValueError(f"image_size {image_size} must be divisible by output_stride {output_stride}")
    grid = image_size // output_stride
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    processor = build_image_processor(image_size)
    model = TowerWithHead(depths, dims, output_stride)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    start, history = time.perf_counter(), []
    for step in range(1, steps + 1):
        pixels, targets = sample_batch(rng, processor, image_size, grid, frames_per_scene, scenes_per_step)
        loss = F.binary_cross_entropy_with_logits(model(pixels), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            history.append({"step": step, "loss": round(loss.item(), 5)})
            print(json.dumps({**history[-1], "seconds": round(time.perf_counter() - start, 1)}), flush=True)

    model.eval()
    eval_rng = np.random.default_rng(seed + 1000)
    with torch.no_grad():
        pixels, targets = sample_batch(eval_rng, processor, image_size, grid, frames_per_scene, 32)
        predicted = model(pixels) > 0
        cell_accuracy = (predicted == targets.bool()).float().mean().item()
        positives = targets.bool()
        recall = (predicted & positives).sum().item() / max(positives.sum().item(), 1)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.tower.state_dict().items()}, str(out))
    return {
        "out": str(out), "steps": steps, "seconds": round(time.perf_counter() - start, 1),
        "final_loss": history[-1]["loss"], "cell_label_accuracy": round(cell_accuracy, 4),
        "positive_label_recall": round(recall, 4), "grid": grid,
    }  # fmt: skip


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m playground.pretrain_tower", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="safetensors file for the tower weights")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--depths", type=_int_list, default=[1, 1, 1, 1])
    parser.add_argument("--dims", type=_int_list, default=[16, 32, 48, 64])
    parser.add_argument("--output-stride", type=int, default=8, choices=[8, 16, 32])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--scenes-per-step", type=int, default=8)
    parser.add_argument("--frames-per-scene", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = pretrain_tower(
        args.out, args.image_size, args.depths, args.dims, args.output_stride, args.steps,
        args.scenes_per_step, args.frames_per_scene, args.lr, args.seed,
    )  # fmt: skip
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
