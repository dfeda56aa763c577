"""Training step: tokens per second and peak memory of a small model's step (forward, backward, AdamW) on video
input, without and with gradient checkpointing; then packed against unpacked training on a length mix like
LLaVA-Video SFT's (:mod:`benchmarks.train_packing`).

Contenders, each its own copy of the same randomly initialised model and its own AdamW, on the same batch:

* ``none``: no checkpointing;
* ``default``: ``gradient_checkpointing_enable()`` (called as ``activation_checkpointing_enable()``,
  transformers' current name for it, which reaches the same ``_set_gradient_checkpointing``): every decoder
  layer of the language model and, through the project's override, timm's ``set_grad_checkpointing`` on the
  ConvNeXt stages;
* ``lm_only``: the same call, then the tower's stages switched back off
  (``model.get_vision_tower().vision_tower.set_grad_checkpointing(False)``): what checkpointing the language
  model alone gives, for comparison.

Which modules end up checkpointing is read back from the models and reported, not assumed.

Peak memory is measured over one whole step, above what was allocated before it (weights and AdamW state,
which exist from the warm-up step on).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from llava.constants import IGNORE_INDEX
from llava.model import LlavaQwenSlowFastForCausalLM

from .common import (
    LM_SHAPES,
    VISION_SHAPES,
    BenchResult,
    Column,
    RunContext,
    Table,
    best,
    build_model,
    make_config,
    median,
    mib,
    peak_memory,
    prompt_ids,
    time_contenders,
    timing_rule,
)
from .train_packing import run_packing

NAME = "train"
TITLE = "Training step: gradient checkpointing off vs. on; packed vs. unpacked on the SFT length mix"
BUILDS_RELEASED_MODEL = False  # the small model at every scale but smoke


@dataclass(frozen=True)
class BatchSpec:
    """One training batch: ``batch_size`` samples, each a video of ``frames`` frames and ``text_tokens`` text
    tokens of which the last ``supervised_tokens`` carry labels."""

    batch_size: int
    frames: int
    text_tokens: int  # per sample, around the video
    supervised_tokens: int  # the answer at the end of the text


BATCHES = {
    "smoke": BatchSpec(1, 4, 32, 8),
    "small": BatchSpec(2, 16, 256, 128),
    "released": BatchSpec(2, 16, 256, 128),
}
MODES = {
    "none": "no checkpointing",
    "default": "gradient_checkpointing_enable() (LM layers + ConvNeXt stages)",
    "lm_only": "LM layers only (the same, then the tower's stages switched off)",
}


def _enable_checkpointing(model: LlavaQwenSlowFastForCausalLM, mode: str) -> None:
    """Switch on the checkpointing of contender ``mode`` (see ``MODES``)."""
    if mode == "none":
        return
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    if mode == "lm_only":
        model.get_vision_tower().vision_tower.set_grad_checkpointing(False)


def checkpointed_modules(model: LlavaQwenSlowFastForCausalLM) -> dict[str, int]:
    """How many LM decoder layers and ConvNeXt stages have checkpointing switched on, read from the modules."""
    layers = model.get_decoder().layers
    stages = model.get_vision_tower().vision_tower.stages
    return dict(
        lm_layers=sum(bool(getattr(layer, "gradient_checkpointing", False)) for layer in layers),
        lm_layers_total=len(layers),
        tower_stages=sum(bool(getattr(stage, "grad_checkpointing", False)) for stage in stages),
        tower_stages_total=len(stages),
    )


def _describe(flags: dict[str, int]) -> str:
    return (
        f"{flags['lm_layers']}/{flags['lm_layers_total']} LM layers, "
        f"{flags['tower_stages']}/{flags['tower_stages_total']} ConvNeXt stages"
    )


def run(ctx: RunContext) -> BenchResult:
    """Time and measure one training step of each contender; report tokens/s and peak memory."""
    start = time.perf_counter()
    lm, vision = LM_SHAPES[ctx.scale], VISION_SHAPES[ctx.scale]
    if ctx.scale == "released":  # the released model does not train on one device; keep the small model
        lm, vision = LM_SHAPES["small"], VISION_SHAPES["small"]
    spec = BATCHES[ctx.scale]
    config = make_config(lm, vision)
    before = 10
    ids = prompt_ids(lm.vocab_size, before=before, after=spec.text_tokens - before).to(ctx.device)
    ids = ids.expand(spec.batch_size, -1).contiguous()
    labels = ids.clone()
    labels[:, : ids.shape[1] - spec.supervised_tokens] = IGNORE_INDEX
    generator = torch.Generator().manual_seed(0)
    size = vision.image_size
    videos = [
        torch.randn(spec.frames, 3, size, size, generator=generator).to(ctx.device, ctx.dtype)
        for _ in range(spec.batch_size)
    ]

    models, steps, flags = {}, {}, {}
    for mode in MODES:
        model = build_model(config, ctx.device, ctx.dtype).train()
        _enable_checkpointing(model, mode)
        flags[mode] = checkpointed_modules(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        models[mode] = model

        def step(model=model, optimizer=optimizer) -> float:
            loss = model(input_ids=ids, labels=labels, images=videos, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach().item()

        steps[mode] = step

    first_losses = {mode: step() for mode, step in steps.items()}  # warm-up; creates the AdamW state
    with torch.no_grad():
        merged = models["none"].prepare_multimodal_inputs(ids, images=videos)
    tokens_per_step = int(merged.attention_mask.sum())
    params = sum(p.numel() for p in models["none"].parameters())
    static_bytes = params * torch.empty(0, dtype=ctx.dtype).element_size() * 3  # weights and AdamW's two moments

    peaks, method = {}, ""
    for mode, step in steps.items():
        reading = peak_memory(step, ctx.device)
        peaks[mode], method = reading.peak_bytes, reading.method
    times = time_contenders(steps, ctx.repeats, ctx.device, warmup=0)
    seconds = {mode: best(values) for mode, values in times.items()}
    rows = [
        dict(
            mode=MODES[mode],
            checkpointed=_describe(flags[mode]),
            seconds_per_step=seconds[mode],
            seconds_per_step_median=median(times[mode]),
            tokens_per_s=tokens_per_step / seconds[mode],
            peak_mib=mib(peaks[mode]),
            peak_vs_none=peaks[mode] / peaks["none"],
            time_vs_none=seconds[mode] / seconds["none"],
        )
        for mode in MODES
    ]
    for row in rows:
        rate = f"{row['seconds_per_step']:.3f} s/step, {row['tokens_per_s']:.0f} tok/s"
        ctx.log(f"  {row['mode']:65s} {rate}, peak {row['peak_mib']:.0f} MiB")
    summary = {
        "tokens_per_step": float(tokens_per_step),
        "tokens_per_s_none": tokens_per_step / seconds["none"],
        "tokens_per_s_default": tokens_per_step / seconds["default"],
        "tokens_per_s_lm_only": tokens_per_step / seconds["lm_only"],
        "peak_mib_none": mib(peaks["none"]),
        "peak_mib_default": mib(peaks["default"]),
        "peak_mib_lm_only": mib(peaks["lm_only"]),
        "peak_default_vs_none": peaks["default"] / peaks["none"],
        "peak_lm_only_vs_none": peaks["lm_only"] / peaks["none"],
        "time_default_vs_none": seconds["default"] / seconds["none"],
        "time_lm_only_vs_none": seconds["lm_only"] / seconds["none"],
        "max_first_loss_difference": max(abs(v - first_losses["none"]) for v in first_losses.values()),
    }
    notes = [
        (
            f"Model: LM hidden {lm.hidden_size}, {lm.num_layers} layers ({lm.hybrid_layers} hybrid); ConvNeXt depths "
            f"{list(vision.depths)}, dims {list(vision.dims)} at {size} px; {params / 1e6:.1f} M parameters, all "
            f"trained. Batch: {spec.batch_size} samples x ({spec.frames} frames + {spec.text_tokens} text tokens, the "
            f"last {spec.supervised_tokens} supervised) = {tokens_per_step} tokens per step in the LM. AdamW, "
            f"{ctx.dtype_name}, {ctx.device_name}; {timing_rule(ctx.repeats)} after a warm-up step."
        ),
        (
            f"Peak memory: {method}, over one step, above the {static_bytes / 2**20:.0f} MiB of weights and AdamW "
            "state held between steps (gradients are allocated inside the step and counted)."
        ),
        (
            "Tokens/s counts the LM sequence (text + fast tokens); the vision tower's frames are extra work not in "
            "that count."
        ),
        (
            "Checkpointing read back from the models: "
            + "; ".join(f"{MODES[mode]}: {_describe(flags[mode])}" for mode in MODES)
            + ". The 'LM layers only' contender is not a project setting: gradient_checkpointing_enable() followed "
            "by vision_tower.set_grad_checkpointing(False), to separate what the tower's checkpointing adds."
        ),
        f"First-step losses agree across the contenders within {summary['max_first_loss_difference']:.2e}.",
    ]
    if ctx.scale == "released":
        notes.append("--released-shape keeps the small model here: the 8.5 B model needs ZeRO-3 over several GPUs.")
    del models, steps
    packing_table, packing_summary, packing_notes = run_packing(ctx)
    summary.update(packing_summary)
    notes += packing_notes
    return BenchResult(
        name=NAME,
        title=TITLE,
        device=ctx.device_name,
        scale=ctx.scale,
        setup=dict(
            lm_shape=lm.__dict__,
            vision_shape=dict(depths=list(vision.depths), dims=list(vision.dims), image_size=size),
            batch=spec.__dict__,
            tokens_per_step=tokens_per_step,
            parameters=params,
            memory_method=method,
            checkpointed=flags,
            dtype=ctx.dtype_name,
            repeats=ctx.repeats,
        ),
        tables=[
            Table(
                title=f"Training step, {ctx.device_name}",
                columns=[
                    Column("mode", "gradient checkpointing"),
                    Column("checkpointed", "checkpointed modules"),
                    Column("seconds_per_step", "s / step", "{:.3f}"),
                    Column("tokens_per_s", "tokens / s", "{:.0f}"),
                    Column("peak_mib", "peak MiB", "{:.0f}"),
                    Column("peak_vs_none", "peak vs. off", "{:.2f}x"),
                    Column("time_vs_none", "time vs. off", "{:.2f}x"),
                ],
                rows=rows,
            ),
            packing_table,
        ],
        summary=summary,
        notes=notes,
        seconds=time.perf_counter() - start,
    )
