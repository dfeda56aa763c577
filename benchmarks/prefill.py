"""Prefill compute: slow-fast against a self-attention-only baseline, for 16 to 128 frames.

Slow-fast: the language model reads ``text + fast tokens`` (1,296 fast tokens in every released recipe) and its
hybrid layers cross-attend to all ``frames x 81`` slow tokens, from the querying (text) positions only. Baseline:
the same language model with no cross-attention, reading ``text + all slow tokens`` as ordinary tokens.

* FLOPs at the released shape (Qwen2-7B, ConvNeXt-XXL at 576 px), counted by
  ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no memory, no arithmetic), for the
  language-model prefill (with ``logits_to_keep=1``, as ``generate`` does) and separately for the vision path
  (tower + projector, identical for both). An analytic count is computed beside it as a cross-check.
  ``hybrid_layer.slow_cross_attention`` reads its query mask on the host to pick the querying rows, which a meta
  tensor cannot give; see [`querying_rows_on_meta`] for how the count gets past that, and the check against a
  count of the unmodified code on real tensors.
* Wall time of the language-model prefill at the benchmark scale on the chosen device (visual tokens given,
  so the vision path is not timed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from llava.constants import TOKEN_TYPE_TEXT, TOKEN_TYPE_VISUAL
from llava.model import SlowFastParams, SlowFastTokens, hybrid_layer
from llava.model.hybrid_layer import cross_attn_query_mask
from llava.model.slow_fast import count_visual_tokens

from .common import (
    LM_SHAPES,
    RELEASED,
    RELEASED_GRID,
    RELEASED_VISION,
    TEXT_AFTER,
    TEXT_BEFORE,
    BenchResult,
    Check,
    Column,
    Figure,
    LMShape,
    Panel,
    RunContext,
    Series,
    Table,
    best,
    build_model,
    make_config,
    median,
    prompt_ids,
    random_visual_tokens,
    released_fast_params,
    time_contenders,
    timing_rule,
)

NAME = "prefill"
TITLE = "Prefill compute: slow-fast vs. every slow token in the sequence"
BUILDS_RELEASED_MODEL = True  # --released-shape builds the 8.5 B model (or its tower): needs a GPU
FRAMES = {"smoke": (2, 4), "small": (16, 32, 64, 128), "released": (16, 32, 64, 128)}
PAPER_CLAIM = 1.03  # paper: 16 -> 128 frames for about 3 % more LLM prefill compute


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch's counter has formulas for the CUDA SDPA kernels but not for the CPU flash kernel that SDPA picks
# on a CPU (torch >= 2.14 there), which it would count as zero.
_EXTRA_FLOP_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FLOP_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_attention_flops


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` as counted by ``FlopCounterMode`` (matmuls, convolutions, attention; 2 per multiply-add)."""
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter, torch.inference_mode():
        fn()
    return int(counter.get_total_flops())


@contextmanager
def querying_rows_on_meta(rows: torch.Tensor) -> Iterator[None]:
    """Let ``hybrid_layer.slow_cross_attention`` run on meta tensors, given the querying rows ``rows`` ``[L]``
    (bool, on the host) that its query mask holds.

    The project's function decides on the host which rows to compute (``bool(rows.all())``, then
    ``rows.nonzero()`` to index them), and a meta tensor has no values to read. While inside, a call with meta
    tensors is answered by calling the project's own function on the querying rows only, with an all-true query
    mask on the host: the same ``scaled_dot_product_attention(query[:, :, rows], keys, values, ...,
    enable_gqa=True)`` that its row-picking branch makes on a real device, followed by the same scatter into
    zeros. Calls with real tensors go to the project's function unchanged. [`device_count_check`] compares the
    count made this way with a count of the unmodified code on real tensors.
    """
    original = hybrid_layer.slow_cross_attention
    picked = rows.nonzero().squeeze(-1)

    def on_meta(query, keys, values, key_mask, query_mask, scaling, use_flash=False):
        if query.device.type != "meta":
            return original(query, keys, values, key_mask, query_mask, scaling, use_flash)
        batch, heads, length, head_dim = query.shape
        if length != rows.numel():
            raise ValueError(f"querying_rows_on_meta: {rows.numel()} rows given for a query of {length} positions")
        host_mask = torch.ones(batch, picked.numel(), dtype=torch.bool)
        if picked.numel() == length:
            return original(query, keys, values, key_mask, host_mask, scaling, use_flash)
        computed = original(query[:, :, picked], keys, values, key_mask, host_mask, scaling, use_flash)
        context = query.new_zeros(batch, length, heads * head_dim)
        context[:, picked.to(query.device)] = computed
        return context

    hybrid_layer.slow_cross_attention = on_meta
    try:
        yield
    finally:
        hybrid_layer.slow_cross_attention = original


def meta_prefill_inputs(
    hidden: int, num_fast: int, num_slow: int, implementation: str
) -> tuple[dict[str, torch.Tensor | None], torch.Tensor]:
    """Meta-device keyword arguments of one prefill: ``inputs_embeds`` ``[1, L, hidden]`` with
    ``L = text + num_fast`` and, when ``num_slow > 0``, slow tokens ``[1, num_slow, hidden]`` with their masks.
    Returns the arguments and, on the host, which of the ``L`` positions query the slow tokens (``[L]`` bool)."""
    types = [TOKEN_TYPE_TEXT] * TEXT_BEFORE + [TOKEN_TYPE_VISUAL] * num_fast + [TOKEN_TYPE_TEXT] * TEXT_AFTER
    length = len(types)
    kwargs: dict[str, torch.Tensor | None] = {"inputs_embeds": torch.empty(1, length, hidden, device="meta")}
    if num_slow == 0:
        return kwargs, torch.zeros(length, dtype=torch.bool)
    query = cross_attn_query_mask(torch.tensor([types]), implementation, torch.tensor([True]))
    kwargs.update(
        slow_tokens=torch.empty(1, num_slow, hidden, device="meta"),
        slow_token_mask=torch.ones(1, num_slow, dtype=torch.bool, device="meta"),
        cross_attn_query_mask=query.to("meta"),
    )
    return kwargs, query.any(0)


def meta_lm_flops(model, hidden: int, num_fast: int, num_slow: int) -> tuple[int, int, int]:
    """Counted FLOPs of one prefill of the meta-device ``model``; also the querying positions and the length."""
    implementation = model.config.cross_attn_implementation
    kwargs, rows = meta_prefill_inputs(hidden, num_fast, num_slow, implementation)
    with querying_rows_on_meta(rows):
        flops = count_flops(partial(model, **kwargs, use_cache=True, logits_to_keep=1))
    return flops, int(rows.sum()), kwargs["inputs_embeds"].shape[1]


def analytic_lm_flops(lm: LMShape, length: int, num_slow: int, queries: int) -> int:
    """Matmul FLOPs of one prefill of ``length`` tokens (2 per multiply-add; attention dense over ``L^2`` as
    the counter counts it), plus, per hybrid layer, the slow key/value projection of ``num_slow`` tokens and the
    cross-attention of ``queries`` positions; the logits of the last position only."""
    h, kv = lm.hidden_size, lm.num_kv_heads * lm.head_dim
    per_layer = 2 * length * (2 * h * h + 2 * h * kv + 3 * h * lm.intermediate_size) + 4 * length * length * h
    total = lm.num_layers * per_layer + 2 * h * lm.vocab_size
    if num_slow:
        per_hybrid = 2 * num_slow * h * 2 * kv + 4 * queries * num_slow * h + 2 * length * h  # kv proj, attention, gate
        total += lm.hybrid_layers * per_hybrid
    return total


def released_flops(frames_list: tuple[int, ...], log: Callable[[str], None]) -> tuple[list[dict], dict]:
    """Count LM and vision FLOPs at the released shape on the meta device, one row per frame count."""
    model = build_model(make_config(RELEASED), "meta")
    vision_model = build_model(make_config(replace(RELEASED, num_layers=1, vocab_size=8), RELEASED_VISION), "meta")
    size = RELEASED_VISION.image_size
    hidden = RELEASED.hidden_size

    rows = []
    for frames in frames_list:
        num_fast, num_slow = count_visual_tokens(frames, RELEASED_GRID, released_fast_params(frames))
        sf, queries, sf_len = meta_lm_flops(model, hidden, num_fast, num_slow)
        base, _, base_len = meta_lm_flops(model, hidden, num_slow, 0)
        # What the cross-attention of the non-querying (fast-token) rows would add, had every position computed
        # it (as the SDPA path did before it picked the querying rows): analytic, for comparison only.
        skipped = RELEASED.hybrid_layers * 4 * (sf_len - queries) * num_slow * hidden
        vision = count_flops(partial(vision_model.encode_frames, torch.empty(frames, 3, size, size, device="meta")))
        analytic_sf = analytic_lm_flops(RELEASED, sf_len, num_slow, queries)
        analytic_base = analytic_lm_flops(RELEASED, base_len, 0, 0)
        rows.append(
            dict(
                frames=frames,
                fast_tokens=num_fast,
                slow_tokens=num_slow,
                querying_positions=queries,
                seq_slow_fast=sf_len,
                seq_baseline=base_len,
                tflops_slow_fast=sf / 1e12,
                tflops_slow_fast_all_positions=(sf + skipped) / 1e12,
                tflops_baseline=base / 1e12,
                slow_fast_vs_baseline=sf / base,
                tflops_vision=vision / 1e12,
                counted_vs_analytic=(sf + base) / (analytic_sf + analytic_base),
            )
        )
        tflops = f"slow-fast {sf / 1e12:.2f}, baseline {base / 1e12:.2f}, vision {vision / 1e12:.1f}"
        log(f"  {frames:4d} frames: {tflops} TFLOPs")
    # The 64-frame checkpoint's own settings at 128 frames keep 32 fast frames (no temporal sampling).
    extra = {}
    if frames_list[-1] == 128:
        params = SlowFastParams(temporal_stride=4, min_fast_frames=16)
        num_fast, num_slow = count_visual_tokens(128, RELEASED_GRID, params)
        extra = dict(fast_tokens=num_fast, tflops_slow_fast=meta_lm_flops(model, hidden, num_fast, num_slow)[0] / 1e12)
    return rows, extra


def device_count_check(lm: LMShape, device_flops: int, num_fast: int, num_slow: int) -> float:
    """Counted FLOPs of the ``lm``-shaped prefill on the meta device (through [`querying_rows_on_meta`]) over
    ``device_flops``, the count of the unmodified project code on real tensors of the same shape."""
    model = build_model(make_config(lm), "meta")
    return meta_lm_flops(model, lm.hidden_size, num_fast, num_slow)[0] / device_flops


def wall_times(ctx: RunContext, frames_list: tuple[int, ...]) -> tuple[list[dict], float]:
    """Best prefill milliseconds of both contenders at the benchmark scale, one row per frame count; also the
    meta-device FLOP count over the count on ``ctx.device`` (real tensors) at the last frame count."""
    lm = LM_SHAPES[ctx.scale]
    model = build_model(make_config(lm), ctx.device, ctx.dtype)
    ids = prompt_ids(lm.vocab_size).to(ctx.device)
    rows = []
    meta_vs_device = float("nan")
    with torch.inference_mode():
        for frames in frames_list:
            tokens = random_visual_tokens(
                frames, RELEASED_GRID, lm.hidden_size, released_fast_params(frames), ctx.device, ctx.dtype
            )
            sf = model.prepare_multimodal_inputs(ids, visual_tokens=[tokens], padding_side="left")
            # baseline: the slow tokens take the fast tokens' place; its own slow tokens are not passed on
            base = model.prepare_multimodal_inputs(
                ids, visual_tokens=[SlowFastTokens(fast=tokens.slow, slow=tokens.slow[:1])], padding_side="left"
            )

            slow_fast = partial(
                model,
                inputs_embeds=sf.inputs_embeds,
                attention_mask=sf.attention_mask,
                position_ids=sf.position_ids,
                slow_tokens=sf.slow_tokens,
                slow_token_mask=sf.slow_token_mask,
                cross_attn_query_mask=sf.cross_attn_query_mask,
                use_cache=True,
                logits_to_keep=1,
            )
            baseline = partial(
                model,
                inputs_embeds=base.inputs_embeds,
                attention_mask=base.attention_mask,
                position_ids=base.position_ids,
                use_cache=True,
                logits_to_keep=1,
            )
            # one warm-up call before the first frame count; later counts reuse the warmed-up kernels
            warmup = 1 if frames == frames_list[0] else 0
            times = time_contenders({"slow_fast": slow_fast, "baseline": baseline}, ctx.repeats, ctx.device, warmup)
            ms_sf, ms_base = best(times["slow_fast"]) * 1e3, best(times["baseline"]) * 1e3
            rows.append(
                dict(
                    frames=frames,
                    seq_slow_fast=sf.inputs_embeds.shape[1],
                    seq_baseline=base.inputs_embeds.shape[1],
                    ms_slow_fast=ms_sf,
                    ms_baseline=ms_base,
                    slow_fast_vs_baseline=ms_sf / ms_base,
                    ms_slow_fast_median=median(times["slow_fast"]) * 1e3,
                    ms_baseline_median=median(times["baseline"]) * 1e3,
                )
            )
            ctx.log(f"  {frames:4d} frames: slow-fast {ms_sf:.1f} ms, baseline {ms_base:.1f} ms")
            if frames == frames_list[-1]:
                device_flops = count_flops(slow_fast)
                meta_vs_device = device_count_check(lm, device_flops, tokens.fast.shape[0], tokens.slow.shape[0])
    return rows, meta_vs_device


def run(ctx: RunContext) -> BenchResult:
    """Count FLOPs at the released shape, time both prefills at ``ctx.scale``, and compare."""
    start = time.perf_counter()
    frames_list = FRAMES[ctx.scale]
    ctx.log("prefill: FLOPs at the released shape (meta device)")
    flops_rows, extra = released_flops(frames_list, ctx.log)
    ctx.log(f"prefill: wall time at the {ctx.scale} shape on {ctx.device}")
    wall_rows, meta_vs_device = wall_times(ctx, frames_list)

    first, last = flops_rows[0], flops_rows[-1]
    summary = {
        "slow_fast_flops_growth": last["tflops_slow_fast"] / first["tflops_slow_fast"],
        "baseline_flops_growth": last["tflops_baseline"] / first["tflops_baseline"],
        "slow_fast_last_vs_baseline_first": last["tflops_slow_fast"] / first["tflops_baseline"],
        "slow_fast_vs_baseline_flops_at_last": last["slow_fast_vs_baseline"],
        "all_positions_flops_growth": last["tflops_slow_fast_all_positions"]
        / first["tflops_slow_fast_all_positions"],
        "vision_share_of_slow_fast_prefill_at_last": last["tflops_vision"]
        / (last["tflops_vision"] + last["tflops_slow_fast"]),
        "counted_vs_analytic": min(r["counted_vs_analytic"] for r in flops_rows),
        "meta_vs_device_count": meta_vs_device,
        "slow_fast_wall_growth": wall_rows[-1]["ms_slow_fast"] / wall_rows[0]["ms_slow_fast"],
        "slow_fast_vs_baseline_wall_at_last": wall_rows[-1]["slow_fast_vs_baseline"],
    }
    if extra:
        summary["slow_fast_128_frames_s1t4_tflops"] = extra["tflops_slow_fast"]
        summary["slow_fast_128_frames_s1t4_growth"] = extra["tflops_slow_fast"] / first["tflops_slow_fast"]
    span = f"{first['frames']} -> {last['frames']} frames"
    growth = summary["slow_fast_flops_growth"]
    checks = [
        Check(
            target=f"paper: {span} costs about 3 % more LM prefill compute (<= {PAPER_CLAIM}x)",
            measured=growth,
            limit=PAPER_CLAIM,
            met=growth <= PAPER_CLAIM,
            reading=f"slow-fast LM prefill grows {growth:.3f}x over {span} on the project's default path (the "
            f"{last['querying_positions']} text positions cross-attend, SDPA or flash-attn alike); vs. the baseline "
            f"at {first['frames']} frames {summary['slow_fast_last_vs_baseline_first']:.3f}x; the baseline grows "
            f"{summary['baseline_flops_growth']:.2f}x over the same span",
        ),
    ]
    lm = LM_SHAPES[ctx.scale]
    frames_x = [r["frames"] for r in flops_rows]
    figure = Figure(
        file="prefill.png",
        panels=[
            Panel(
                title="LM prefill FLOPs, released shape (counted)",
                xlabel="frames",
                logx=True,
                ylabel="TFLOPs",
                series=[
                    Series("slow-fast (text positions query)", frames_x, [r["tflops_slow_fast"] for r in flops_rows]),
                    Series(
                        "slow-fast if every position queried (analytic)",
                        frames_x,
                        [r["tflops_slow_fast_all_positions"] for r in flops_rows],
                        "--",
                    ),
                    Series("baseline: slow tokens in sequence", frames_x, [r["tflops_baseline"] for r in flops_rows]),
                ],
            ),
            Panel(
                title=f"LM prefill wall time, {ctx.scale} shape ({ctx.device})",
                xlabel="frames",
                logx=True,
                ylabel="ms",
                series=[
                    Series("slow-fast", frames_x, [r["ms_slow_fast"] for r in wall_rows]),
                    Series("baseline", frames_x, [r["ms_baseline"] for r in wall_rows]),
                ],
            ),
        ],
    )
    notes = [
        (
            "FLOPs: torch.utils.flop_counter.FlopCounterMode on the meta device at the released shape (Qwen2-7B, "
            "hybrid layers 0/8/16/24, ConvNeXt-XXL at 576 px), batch 1, "
            f"{TEXT_BEFORE + TEXT_AFTER} text tokens, logits for the last position only. It counts matmuls, "
            "convolutions and attention (2 FLOPs per multiply-add; causal attention counted dense over L^2); "
            "norms, softmax and element-wise ops are not counted. "
            f"Counted/analytic agreement: >= {summary['counted_vs_analytic']:.4f}."
        ),
        (
            "slow_cross_attention picks the querying rows on the host (bool(rows.all()), rows.nonzero()), which "
            "meta tensors cannot answer. For the meta count the benchmark reads those rows from the host copy of "
            "the same query mask and calls the project's slow_cross_attention on them only, which is the SDPA call "
            "(enable_gqa=True) its row-picking branch makes on a real device. Check: at the "
            f"{ctx.scale} shape, 128-frame token counts, the meta count over a count of the unmodified code on "
            f"real {ctx.device} tensors = {meta_vs_device:.6f}."
        ),
        (
            "Fast tokens follow the released recipes (64-frame checkpoint: temporal stride 4, at least 16 fast "
            "frames; the 128-frame recipe also samples every 2nd frame), so every row has 1,296 fast tokens."
        ),
        (
            f"Only the {last['querying_positions']} text positions query the slow tokens "
            "(cross_attn_implementation text-only-vanilla-flashattn); the SDPA path (CPU, or a GPU without "
            "flash-attn) and the flash-attn varlen path now both compute just those rows (for batch 1 the same "
            "rows). Had every position computed the cross-attention and discarded the fast-token rows, as the SDPA "
            f"path did before, the prefill would grow {summary['all_positions_flops_growth']:.3f}x over {span} "
            f"({last['tflops_slow_fast_all_positions']:.2f} TFLOPs at {last['frames']} frames; analytic, the "
            "dashed line in the plot)."
        ),
        (
            f"Wall time: {ctx.scale} shape (hidden {lm.hidden_size}, {lm.num_layers} layers, hybrid every "
            f"{lm.cross_attn_every}) on {ctx.device_name}, {ctx.dtype_name}, {timing_rule(ctx.repeats)} "
            "after one warm-up call; the same token counts as the released recipe. A narrow model spends a larger "
            "share on attention (L^2 * hidden against L * hidden^2), which flatters slow-fast against the baseline; "
            "the FLOPs table is the released-shape comparison."
        ),
    ]
    if extra:
        notes.append(
            f"With the 64-frame checkpoint's own settings (no temporal sampling) 128 frames give "
            f"{extra['fast_tokens']} fast tokens and {extra['tflops_slow_fast']:.2f} TFLOPs "
            f"({summary['slow_fast_128_frames_s1t4_growth']:.2f}x the 16-frame prefill)."
        )
    return BenchResult(
        name=NAME,
        title=TITLE,
        device=ctx.device_name,
        scale=ctx.scale,
        setup=dict(
            frames=list(frames_list),
            text_tokens=TEXT_BEFORE + TEXT_AFTER,
            flops_shape="released (meta device)",
            flops_method="torch.utils.flop_counter.FlopCounterMode on meta tensors; querying rows read on the host",
            wall_shape=ctx.scale,
            lm_shape=lm.__dict__,
            dtype=ctx.dtype_name,
            repeats=ctx.repeats,
        ),
        tables=[
            Table(
                title="LM prefill FLOPs at the released shape (FlopCounterMode, meta device)",
                columns=[
                    Column("frames", "frames"),
                    Column("fast_tokens", "fast tok", "{:,}"),
                    Column("slow_tokens", "slow tok", "{:,}"),
                    Column("seq_baseline", "baseline seq", "{:,}"),
                    Column("tflops_slow_fast", "slow-fast TFLOPs", "{:.2f}"),
                    Column("tflops_baseline", "baseline TFLOPs", "{:.2f}"),
                    Column("slow_fast_vs_baseline", "slow-fast / baseline", "{:.3f}"),
                    Column("tflops_vision", "vision TFLOPs (both)", "{:.1f}"),
                ],
                rows=flops_rows,
            ),
            Table(
                title=f"LM prefill wall time, {ctx.scale} shape, {ctx.device_name}",
                columns=[
                    Column("frames", "frames"),
                    Column("seq_slow_fast", "slow-fast seq", "{:,}"),
                    Column("seq_baseline", "baseline seq", "{:,}"),
                    Column("ms_slow_fast", "slow-fast ms", "{:.1f}"),
                    Column("ms_baseline", "baseline ms", "{:.1f}"),
                    Column("slow_fast_vs_baseline", "slow-fast / baseline", "{:.3f}"),
                ],
                rows=wall_rows,
            ),
        ],
        summary=summary,
        checks=checks,
        notes=notes,
        figures=[figure],
        seconds=time.perf_counter() - start,
    )
