"""Vision encoding: peak memory and frames per second against the number of frames, chunked vs. all at once.

``model.encode_frames(frames)`` (ConvNeXt tower, then the projector) with ``config.mm_vision_chunk_frames``
set to the chunk size, against ``None`` (every frame in one batch), under ``torch.inference_mode``.

Peak memory is the peak of memory allocated during the call above what was allocated before it (the model and
the input frames are not counted). Its output, ``[T, grid^2, hidden]``, necessarily grows with the frames, so
the table also gives the peak minus the output's size: the working memory the target is about.
"""

from __future__ import annotations

import time
from dataclasses import replace
from functools import partial

import torch

from llava.model import LlavaQwenSlowFastForCausalLM

from .common import (
    LM_SHAPES,
    VISION_SHAPES,
    BenchResult,
    Check,
    Column,
    Figure,
    Panel,
    RunContext,
    Series,
    Table,
    best,
    build_model,
    is_out_of_memory,
    make_config,
    median,
    mib,
    peak_memory,
    ratio,
    time_contenders,
    timing_rule,
)

NAME = "vision"
TITLE = "Vision encoding: chunked vs. all frames at once"
BUILDS_RELEASED_MODEL = True  # --released-shape builds the 8.5 B model (or its tower): needs a GPU
FRAMES = {"smoke": (2, 4), "small": (16, 32, 64, 128), "released": (16, 32, 64, 128)}
CHUNK = {"smoke": 1, "small": 8, "released": 8}
TARGET = 1.1  # chunked peak (above the output) flat within 1.1x from the first to the last frame count


def encode(model: LlavaQwenSlowFastForCausalLM, pixels: torch.Tensor, chunk_frames: int | None) -> torch.Tensor:
    """``model.encode_frames(pixels)`` (``[T, 3, S, S]`` -> ``[T, grid^2, hidden]``) with ``chunk_frames`` frames per
    chunk (``None``: all at once), under ``torch.inference_mode``."""
    model.config.mm_vision_chunk_frames = chunk_frames
    with torch.inference_mode():
        return model.encode_frames(pixels)


def run(ctx: RunContext) -> BenchResult:
    """Encode ``T`` random frames for each ``T`` in ``FRAMES``, both ways; measure peak memory and frames/s."""
    start = time.perf_counter()
    vision, lm = VISION_SHAPES[ctx.scale], LM_SHAPES[ctx.scale]
    frames_list, chunk = FRAMES[ctx.scale], CHUNK[ctx.scale]
    # only the tower and projector run: a one-layer language model with a tiny vocabulary keeps the model small
    config = make_config(replace(lm, num_layers=1, vocab_size=8), vision)
    model = build_model(config, ctx.device, ctx.dtype)
    size = vision.image_size
    modes = {"chunked": chunk, "all_at_once": None}
    rows, method = [], ""
    for frames in frames_list:
        pixels = torch.randn(frames, 3, size, size, generator=torch.Generator().manual_seed(frames))
        pixels = pixels.to(ctx.device, ctx.dtype)
        output_bytes = frames * vision.grid**2 * lm.hidden_size * pixels.element_size()
        row: dict = dict(
            frames=frames, output_mib=mib(output_bytes), input_mib=mib(pixels.numel() * pixels.element_size())
        )
        contenders = {name: partial(encode, model, pixels, chunk_frames) for name, chunk_frames in modes.items()}
        for name, call in contenders.items():
            try:
                reading = peak_memory(call, ctx.device)
            except RuntimeError as err:  # a GPU may not fit every frame at once at the released shape
                if not is_out_of_memory(err):
                    raise
                torch.cuda.empty_cache()
                row[f"{name}_peak_mib"] = row[f"{name}_above_output_mib"] = row[f"{name}_fps"] = None
                contenders[name] = None
                continue
            method = reading.method
            del reading.result
            row[f"{name}_peak_mib"] = mib(reading.peak_bytes)
            row[f"{name}_above_output_mib"] = mib(reading.peak_bytes - output_bytes)
        runnable = {name: fn for name, fn in contenders.items() if fn is not None}
        times = time_contenders(runnable, ctx.repeats, ctx.device)
        for name, values in times.items():
            row[f"{name}_fps"] = frames / best(values)
            row[f"{name}_fps_median"] = frames / median(values)
        rows.append(row)
        ctx.log(
            f"  {frames:4d} frames: chunked peak {_fmt(row['chunked_peak_mib'])} MiB "
            f"({_fmt(row['chunked_above_output_mib'])} above output), "
            f"all at once {_fmt(row['all_at_once_peak_mib'])} MiB"
        )
    model.config.mm_vision_chunk_frames = None

    first, last = rows[0], rows[-1]
    summary = {
        "chunked_peak_growth": ratio(last["chunked_peak_mib"], first["chunked_peak_mib"]),
        "chunked_above_output_growth": ratio(last["chunked_above_output_mib"], first["chunked_above_output_mib"]),
        "all_at_once_peak_growth": ratio(last["all_at_once_peak_mib"], first["all_at_once_peak_mib"]),
        "chunked_vs_all_at_once_peak_at_last": ratio(last["chunked_peak_mib"], last["all_at_once_peak_mib"]),
        "chunked_fps_at_last": last["chunked_fps"],
        "all_at_once_fps_at_last": last["all_at_once_fps"],
        "chunked_vs_all_at_once_fps_at_last": ratio(last["chunked_fps"], last["all_at_once_fps"]),
    }
    span = f"{first['frames']} -> {last['frames']} frames"
    growth, growth_total = summary["chunked_above_output_growth"], summary["chunked_peak_growth"]
    checks = [
        Check(
            target=f"chunked peak memory flat within {TARGET}x over {span} (peak minus the output)",
            measured=growth,
            limit=TARGET,
            met=growth is not None and growth <= TARGET,
            reading=f"chunked working memory grows {_fmt(growth, '{:.2f}')}x "
            f"({_fmt(first['chunked_above_output_mib'])} -> {_fmt(last['chunked_above_output_mib'])} MiB); the total "
            f"peak grows {_fmt(growth_total, '{:.2f}')}x because it holds the output "
            f"({_fmt(first['output_mib'])} -> {_fmt(last['output_mib'])} MiB); all at once grows "
            f"{_fmt(summary['all_at_once_peak_growth'], '{:.1f}')}x",
        )
    ]
    frames_x = [r["frames"] for r in rows]
    figure = Figure(
        file="vision.png",
        panels=[
            Panel(
                title=f"Vision encoding peak memory, {ctx.scale} shape ({ctx.device})",
                xlabel="frames",
                logx=True,
                ylabel="MiB above the model and input",
                series=[
                    Series("all at once", frames_x, [r["all_at_once_peak_mib"] for r in rows]),
                    Series(f"chunked ({chunk} frames)", frames_x, [r["chunked_peak_mib"] for r in rows]),
                    Series("chunked, minus the output", frames_x, [r["chunked_above_output_mib"] for r in rows], "--"),
                    Series("output size", frames_x, [r["output_mib"] for r in rows], ":"),
                ],
            ),
            Panel(
                title="Vision encoding throughput",
                xlabel="frames",
                logx=True,
                ylabel="frames / s",
                series=[
                    Series("all at once", frames_x, [r["all_at_once_fps"] for r in rows]),
                    Series(f"chunked ({chunk} frames)", frames_x, [r["chunked_fps"] for r in rows]),
                ],
            ),
        ],
    )
    notes = [
        (
            f"{ctx.scale} shape: ConvNeXt depths {list(vision.depths)}, dims {list(vision.dims)} at {size} px "
            f"({vision.grid}x{vision.grid} tokens per frame), projector to {lm.hidden_size}; chunks of {chunk} frames; "
            f"{ctx.device_name}, {ctx.dtype_name}, torch.inference_mode; frames/s from the "
            f"{timing_rule(ctx.repeats)} after a warm-up."
        ),
        (
            f"Peak memory: {method}; the model's weights and the input frames are excluded (the input, "
            f"{_fmt(last['input_mib'])} MiB at {last['frames']} frames, also grows with the frames)."
        ),
        (
            "The target concerns the working memory (peak minus the output), since the output grows with the frames "
            "by construction. encode_frames concatenates the per-chunk outputs, so for a moment both the chunks and "
            "their concatenation are alive (twice the output): this sets the peak only when the output is larger "
            "than one chunk's activations."
        ),
    ]
    return BenchResult(
        name=NAME,
        title=TITLE,
        device=ctx.device_name,
        scale=ctx.scale,
        setup=dict(
            frames=list(frames_list),
            chunk_frames=chunk,
            vision_shape=dict(depths=list(vision.depths), dims=list(vision.dims), image_size=size),
            projector_hidden=lm.hidden_size,
            memory_method=method,
            dtype=ctx.dtype_name,
            repeats=ctx.repeats,
        ),
        tables=[
            Table(
                title=f"Vision encoding, {ctx.scale} shape, {ctx.device_name}",
                columns=[
                    Column("frames", "frames"),
                    Column("output_mib", "output MiB", "{:.1f}"),
                    Column("chunked_peak_mib", "chunked peak MiB", "{:.1f}"),
                    Column("chunked_above_output_mib", "chunked minus output", "{:.1f}"),
                    Column("all_at_once_peak_mib", "all-at-once peak MiB", "{:.1f}"),
                    Column("all_at_once_above_output_mib", "all-at-once minus output", "{:.1f}"),
                    Column("chunked_fps", "chunked frames/s", "{:.1f}"),
                    Column("all_at_once_fps", "all-at-once frames/s", "{:.1f}"),
                ],
                rows=rows,
            )
        ],
        summary=summary,
        checks=checks,
        notes=notes,
        figures=[figure],
        seconds=time.perf_counter() - start,
    )


def _fmt(value: float | None, spec: str = "{:.1f}") -> str:
    return "n/a" if value is None else spec.format(value)
