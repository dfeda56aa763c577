"""Training steps on a length mix like LLaVA-Video SFT's, packed against unpacked: padding, real tokens per second
and peak memory (part of the ``train`` benchmark).

One set of samples (64-frame videos with 20-400 text tokens, images, text-only samples of 50-1,500 tokens) is
trained once through by each contender (forward and backward per micro-batch, one AdamW step for the whole pass, so
that every contender does the same optimiser work), each with its own copy of the same model:

* ``batch 1``: one sample per micro-batch, the SFT recipe (no padding);
* ``batch 4``: four samples per micro-batch in the length-grouped, modality-grouped order of
  ``--group_by_modality_length``, padded to the longest;
* ``packed``: ``--packing``: rows of at most ``max_packed_length`` positions planned from the lengths, one row a
  micro-batch, each sample computed as if alone (flash-attn's varlen kernel on GPU when installed; on CPU SDPA with
  a block-diagonal mask).

Real tokens are the language model's positions that belong to a sample (text and fast tokens); padding fraction is
the share of the micro-batches' positions that are padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.model import SlowFastParams
from llava.model.slow_fast import count_visual_tokens
from llava.train.collators import DataCollatorForSupervisedDataset, PackedDataCollator
from llava.train.sampling import PlannedBatchSampler, get_modality_length_grouped_indices

from .common import (
    LM_SHAPES,
    VISION_SHAPES,
    Column,
    RunContext,
    Table,
    best,
    build_model,
    make_config,
    mib,
    peak_memory,
    time_contenders,
)


@dataclass(frozen=True)
class Mix:
    """How many samples of each kind, the frames of a video, and the budgets."""

    videos: int
    images: int
    texts: int
    frames: int
    max_length: int
    max_packed_length: int


MIXES = {
    "smoke": Mix(2, 1, 1, 8, 512, 512),
    "small": Mix(5, 2, 3, 64, 2048, 2048),
    "released": Mix(14, 5, 5, 64, 4096, 8192),
}


def make_samples(mix: Mix, vocab: int, grid: int, params: SlowFastParams, image_size: int, seed: int = 0) -> list[dict]:
    """Dataset items of the mix, in a shuffled order: ids with a ``-200`` for visual samples, the answer (the last
    third of the text) supervised, random pixels, and ``num_positions``."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    kinds = ["video"] * mix.videos + ["image"] * mix.images + ["text"] * mix.texts
    items = []
    for k in rng.permutation(len(kinds)):
        kind = kinds[k]
        text = int(rng.integers(20, 401) if kind != "text" else rng.integers(50, 1501))
        text = min(text, mix.max_length - (count_visual_tokens(mix.frames, grid, params)[0] if kind == "video" else 0) - 2)
        ids = torch.randint(2, vocab - 1, (text,), generator=generator)
        pixels = None
        if kind != "text":
            ids = torch.cat([ids[:10], torch.tensor([IMAGE_TOKEN_INDEX]), ids[10:]])
            frames = mix.frames if kind == "video" else 1
            pixels = torch.randn(frames, 3, image_size, image_size, generator=generator)
        labels = ids.clone()
        labels[: len(ids) - max(1, text // 3)] = IGNORE_INDEX
        labels[ids == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
        positions = len(ids) + (count_visual_tokens(pixels.shape[0], grid, params)[0] - 1 if pixels is not None else 0)
        items.append({"input_ids": ids, "labels": labels, "pixel_values": pixels, "num_positions": positions, "kind": kind})
    return items


def micro_batches(items: list[dict], mix: Mix) -> dict[str, list[list[int]]]:
    """Each contender's micro-batches (indices into ``items``)."""
    lengths = np.array([item["num_positions"] for item in items])
    visual = np.array([item["kind"] != "text" for item in items])
    signed = np.where(visual, lengths, -lengths)
    order = get_modality_length_grouped_indices(signed, 4, 1, generator=torch.Generator().manual_seed(0))
    packed = PlannedBatchSampler(lengths, seed=0, max_packed_length=mix.max_packed_length)
    return {
        "batch 1": [[k] for k in range(len(items))],
        "batch 4": [order[k : k + 4] for k in range(0, len(order), 4)],
        "packed": list(packed),
    }


def run_packing(ctx: RunContext) -> tuple[Table, dict, list[str]]:
    """Measure the three contenders; return their table, summary numbers and notes."""
    if ctx.scale == "released":
        lm, vision = LM_SHAPES["qwen2_0_5b"], VISION_SHAPES["released"]
    else:
        lm, vision = LM_SHAPES[ctx.scale], VISION_SHAPES[ctx.scale]
    mix = MIXES[ctx.scale]
    on_gpu = torch.device(ctx.device).type == "cuda"
    attention = "sdpa"
    if on_gpu:
        from llava.model.hybrid_layer import flash_attn_varlen_func

        attention = "flash_attention_2" if flash_attn_varlen_func is not None and ctx.dtype != torch.float32 else "sdpa"
    config = make_config(lm, vision, tokenizer_model_max_length=mix.max_length, mm_vision_chunk_frames=16 if on_gpu else None)
    config._attn_implementation = attention
    grid = vision.image_size // 32
    params = SlowFastParams.from_config(config)
    items = make_samples(mix, lm.vocab_size, grid, params, vision.image_size)
    plans = micro_batches(items, mix)
    pad = SimpleNamespace(pad_token_id=0)
    collate = {"batch 1": DataCollatorForSupervisedDataset(pad), "batch 4": DataCollatorForSupervisedDataset(pad),
               "packed": PackedDataCollator(pad, mix.max_packed_length)}
    freeze_tower = ctx.scale == "released"
    repeats = ctx.repeats if on_gpu else min(ctx.repeats, 2)  # a CPU pass over 64-frame videos takes a while
    real = sum(item["num_positions"] for item in items)
    epochs, padded, peaks, first_losses = {}, {}, {}, {}
    for name, plan in plans.items():
        model = build_model(config, ctx.device, ctx.dtype).train()
        model.config._attn_implementation = attention
        if freeze_tower:
            model.get_vision_tower().requires_grad_(False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        batches = []
        for indices in plan:
            batch = collate[name]([items[k] for k in indices])
            batches.append({k: _to(v, ctx.device, ctx.dtype) for k, v in batch.items()})
        padded[name] = sum(_positions(model, batch) for batch in batches)

        def epoch(model=model, optimizer=optimizer, batches=batches) -> float:
            # forward and backward per micro-batch, one AdamW step for the pass: every contender does the same
            # optimiser work, so the comparison is the forward and backward of each batching
            total = 0.0
            for batch in batches:
                loss = model(**batch, use_cache=False).loss
                loss.backward()
                total += loss.detach().float().item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return total

        first_losses[name] = epoch()  # warm-up, creates AdamW's state
        peaks[name] = max(peak_memory(lambda b=b, m=model: _step(m, b), ctx.device).peak_bytes for b in batches)
        epochs[name] = epoch
    # interleaved (A B C A B C ...), so that the machine's load drifts over every contender alike
    times = time_contenders(epochs, repeats, ctx.device, warmup=0)
    rows = []
    for name, plan in plans.items():
        seconds = best(times[name])
        rows.append(dict(
            contender=name, micro_batches=len(plan), samples=len(items), real_tokens=real, positions=padded[name],
            padding=1 - real / padded[name], seconds=seconds, real_tokens_per_s=real / seconds,
            peak_mib=mib(peaks[name]),
        ))
        ctx.log(f"  {name:8s} {len(plan):3d} micro-batches, padding {100 * (1 - real / padded[name]):4.1f} %, "
                f"{real / seconds:8.0f} real tok/s, peak {mib(peaks[name]):.0f} MiB")
    by = {row["contender"]: row for row in rows}
    summary = {
        "packed_real_tokens_per_s": by["packed"]["real_tokens_per_s"],
        "batch1_real_tokens_per_s": by["batch 1"]["real_tokens_per_s"],
        "batch4_real_tokens_per_s": by["batch 4"]["real_tokens_per_s"],
        "packed_vs_batch1_speed": by["packed"]["real_tokens_per_s"] / by["batch 1"]["real_tokens_per_s"],
        "packed_vs_batch4_speed": by["packed"]["real_tokens_per_s"] / by["batch 4"]["real_tokens_per_s"],
        "packed_padding": by["packed"]["padding"],
        "batch4_padding": by["batch 4"]["padding"],
        "packed_peak_mib": by["packed"]["peak_mib"],
        "batch1_peak_mib": by["batch 1"]["peak_mib"],
    }
    kinds = {kind: sum(item["kind"] == kind for item in items) for kind in ("video", "image", "text")}
    notes = [
        f"Packing mix: {kinds['video']} videos of {mix.frames} frames with 20-400 text tokens, {kinds['image']} images "
        f"with 20-400, {kinds['text']} text-only samples of 50-1,500 tokens; {real} real positions in all (text and "
        f"fast tokens). Model: LM hidden {lm.hidden_size}, {lm.num_layers} layers; ConvNeXt depths {list(vision.depths)}, "
        f"dims {list(vision.dims)} at {vision.image_size} px"
        + (" (frozen: the 0.5 B-parameter LM trains, the tower only encodes)" if freeze_tower else "")
        + f"; attention {attention}; {ctx.dtype_name} on {ctx.device_name}. packed: rows of {mix.max_packed_length} "
        f"positions; batch 4: modality- and length-grouped order. One pass over the samples per timing (forward and "
        f"backward per micro-batch, one AdamW step per pass), the contenders interleaved, best of {repeats} after a "
        f"warm-up pass.",
        "Peak memory: the largest micro-batch's forward and backward, above the weights and AdamW state. On a CPU the vision tower's "
        "work, which packing does not change, is most of a step's time; on a GPU the language model's share and the "
        "idle capacity of small micro-batches are larger (scripts/check_gpu.sh runs this at the released shape).",
    ]
    table = Table(
        title=f"Packed vs. unpacked training on the SFT length mix, {ctx.device_name}",
        columns=[
            Column("contender", "micro-batches of"), Column("micro_batches", "steps"),
            Column("positions", "LM positions"), Column("padding", "padding", "{:.1%}"),
            Column("seconds", "s / pass", "{:.2f}"), Column("real_tokens_per_s", "real tokens / s", "{:.0f}"),
            Column("peak_mib", "peak MiB", "{:.0f}"),
        ],
        rows=rows,
    )
    return table, summary, notes


def _to(value, device, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, list):
        return [_to(v, device, dtype) for v in value]
    return value


def _positions(model, batch: dict) -> int:
    """LM positions of a collated micro-batch, padding included (rows x longest merged row)."""
    fast = {}
    rows = []
    ids, mask = batch["input_ids"], batch["attention_mask"]
    images = iter(batch["images"] or [])
    grid = model.get_vision_tower().spec.image_size // 32
    for row, keep in zip(ids, mask):
        count = int(keep.sum())
        for _ in range(int((row[keep] == IMAGE_TOKEN_INDEX).sum())):
            frames = next(images).shape[0]
            if frames not in fast:
                fast[frames] = count_visual_tokens(frames, grid, model.slow_fast_params)[0]
            count += fast[frames] - 1
        rows.append(count)
    return len(rows) * max(rows)


def _step(model, batch) -> None:
    """Forward and backward of one micro-batch; its gradients are then dropped."""
    model(**batch, use_cache=False).loss.backward()
    model.zero_grad(set_to_none=True)
