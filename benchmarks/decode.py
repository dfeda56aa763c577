"""Decode: milliseconds per new token with about 5,000 slow tokens (64 frames x 81), five ways.

* ``cached`` (this project): a [`SlowFastCache`] keeps each hybrid layer's projected slow keys/values from
  the prefill; every decode step reads them (``scaled_dot_product_attention(..., enable_gqa=True)``: the
  key/value heads are shared by their groups of query heads, not copied to each).
* ``recomputed`` (the reference's way): a cache that never stores them, so every decode step normalises and
  projects all slow tokens through ``cross_attn_kv_proj`` again.
* ``slow_off``: no slow tokens and no cross-attention, the same fast-token prompt.
* ``static``: ``cache_implementation="static"`` (a [`SlowFastStaticCache`]: preallocated self-attention
  keys/values plus the cached slow keys/values), eager.
* ``static_compiled``: the same with the decoding step compiled by ``torch.compile`` (transformers'
  ``compile_config``; the prefill stays eager).

At the ``small`` scale the comparison runs at two language-model shapes, the small one and Qwen2-0.5B's.

Greedy decoding of a fixed number of tokens (``min_new_tokens = max_new_tokens``) after a warm-up; the time
per token is measured inside ``generate`` by a logits processor that stamps the clock after every forward,
so the prompt's prefill is excluded.
"""

from __future__ import annotations

import time

import torch
from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList

from llava.model import SlowFastCache

from .common import (
    LM_SHAPES,
    RELEASED,
    RELEASED_GRID,
    BenchResult,
    Check,
    Column,
    LMShape,
    RunContext,
    Table,
    best,
    build_model,
    lm_parameters,
    make_config,
    median,
    prompt_ids,
    random_visual_tokens,
    ratio,
    released_fast_params,
    synchronize,
    timing_rule,
)

NAME = "decode"
TITLE = "Decode: cached slow keys/values vs. recomputed vs. slow path off; static and compiled"
BUILDS_RELEASED_MODEL = True  # --released-shape builds the 8.5 B model (or its tower): needs a GPU
FRAMES = {"smoke": 4, "small": 64, "released": 64}
NEW_TOKENS = {"smoke": 4, "small": 32, "released": 32}
SHAPES = {"smoke": ("smoke",), "small": ("small", "qwen2_0_5b"), "released": ("released",)}
# cached decoding within this factor of slow path off, by median (the targets)
TARGETS = {"smoke": 1.1, "small": 1.1, "qwen2_0_5b": 1.05, "released": 1.05}
NAMES = ("cached", "recomputed", "slow_off", "static", "static_compiled")
LABELS = {
    "cached": "cached once, dynamic cache, eager (this project's default)",
    "recomputed": "recomputed every step (reference)",
    "slow_off": "slow path off",
    "static": "cached once, static cache, eager",
    "static_compiled": "cached once, static cache, compiled",
}


class RecomputeSlowCache(SlowFastCache):
    """A [`SlowFastCache`] that never keeps the slow keys/values: every step re-projects the slow tokens."""

    def get_slow(self, layer_idx: int) -> None:
        return None

    def set_slow(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        return None


class StepClock(LogitsProcessor):
    """Stamps ``time.perf_counter()`` (after synchronising ``device``) each time ``generate`` scores a step."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores

    def ms_per_token(self) -> float:
        """Mean milliseconds per decode step: the first stamp follows the prefill, later ones a decode step."""
        steps = len(self.stamps) - 1
        return (self.stamps[-1] - self.stamps[0]) / steps * 1e3


def _bytes_per_step(lm: LMShape, num_slow: int, dtype: torch.dtype) -> str:
    """Describe the slow keys/values read per decode step against the weights read per step."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    stored = lm.hybrid_layers * num_slow * 2 * lm.num_kv_heads * lm.head_dim * itemsize
    weights = (lm_parameters(lm) - lm.vocab_size * lm.hidden_size) * itemsize  # the input embedding is not read
    return f"{stored / 2**20:.0f} MiB of slow keys/values against {weights / 2**20:,.0f} MiB of weights ({stored / weights:.1%})"


def _compile_config() -> CompileConfig:
    config = CompileConfig(fullgraph=False, dynamic=False)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told (CPU here)
    return config


def _measure_shape(ctx: RunContext, shape: str) -> dict:
    """Time every way of decoding at one language-model shape; interleaved rounds after a warm-up."""
    lm = LM_SHAPES[shape]
    frames, new_tokens = FRAMES[ctx.scale], NEW_TOKENS[ctx.scale]
    config = make_config(lm)
    model = build_model(config, ctx.device, ctx.dtype)
    ids = prompt_ids(lm.vocab_size).to(ctx.device)
    tokens = random_visual_tokens(
        frames, RELEASED_GRID, lm.hidden_size, released_fast_params(frames), ctx.device, ctx.dtype
    )
    with torch.inference_mode():
        merged = model.prepare_multimodal_inputs(ids, visual_tokens=[tokens], padding_side="left")
    common = dict(max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False, pad_token_id=0)
    compile_config = _compile_config()

    def generate(name: str) -> tuple[float, torch.Tensor]:
        clock = StepClock(ctx.device)
        processors = LogitsProcessorList([clock])
        if name == "slow_off":
            out = model.generate(
                inputs_embeds=merged.inputs_embeds,
                attention_mask=merged.attention_mask,
                past_key_values=SlowFastCache(config=config),
                logits_processor=processors,
                **common,
            )
        elif name in ("static", "static_compiled"):
            extra = dict(compile_config=compile_config) if name == "static_compiled" else dict(disable_compile=True)
            out = model.generate(
                ids, visual_tokens=[tokens], cache_implementation="static", logits_processor=processors, **extra, **common
            )
        else:
            cache = SlowFastCache(config=config) if name == "cached" else RecomputeSlowCache(config=config)
            out = model.generate(
                ids, visual_tokens=[tokens], past_key_values=cache, logits_processor=processors, **common
            )
        return clock.ms_per_token(), out

    torch._dynamo.reset()
    warm_start = time.perf_counter()
    outputs = {name: generate(name)[1] for name in NAMES}  # warm-up (compiles the static decoding step)
    ctx.log(f"  {shape}: warm-up and compilation {time.perf_counter() - warm_start:.1f} s")
    per_token: dict[str, list[float]] = {name: [] for name in NAMES}
    for _ in range(ctx.repeats):
        for name in NAMES:
            per_token[name].append(generate(name)[0])
    for name in NAMES:
        runs = ", ".join(f"{v:.2f}" for v in per_token[name])
        ctx.log(f"  {shape:10s} {name:16s} median {median(per_token[name]):8.2f} ms/token  (runs: {runs})")
    del model
    return dict(
        lm=lm,
        frames=frames,
        new_tokens=new_tokens,
        num_slow=tokens.slow.shape[0],
        num_fast=tokens.fast.shape[0],
        positions=int(merged.inputs_embeds.shape[1]),
        per_token=per_token,
        equal={name: torch.equal(outputs[name], outputs["cached"]) for name in NAMES if name != "slow_off"},
    )


def run(ctx: RunContext) -> BenchResult:
    """Generate ``NEW_TOKENS`` tokens after a 64-frame prompt each way, at each shape, and compare ms/token."""
    start = time.perf_counter()
    shapes = SHAPES[ctx.scale]
    measured = {shape: _measure_shape(ctx, shape) for shape in shapes}

    summary: dict[str, float | None] = {}
    tables, checks = [], []
    notes = []
    for shape, m in measured.items():
        med = {name: median(values) for name, values in m["per_token"].items()}
        fastest = {name: best(values) for name, values in m["per_token"].items()}
        suffix = "" if shape == shapes[0] else f"_{shape}"
        cached_vs_off = med["cached"] / med["slow_off"]
        summary.update({
            f"ms_per_token_cached{suffix}": med["cached"],
            f"ms_per_token_recomputed{suffix}": med["recomputed"],
            f"ms_per_token_slow_off{suffix}": med["slow_off"],
            f"ms_per_token_static{suffix}": med["static"],
            f"ms_per_token_static_compiled{suffix}": med["static_compiled"],
            f"cached_vs_slow_off{suffix}": cached_vs_off,
            f"recomputed_vs_cached{suffix}": med["recomputed"] / med["cached"],
            f"static_compiled_vs_cached{suffix}": med["static_compiled"] / med["cached"],
            f"all_ways_tokens_equal{suffix}": float(all(m["equal"].values())),
        })  # fmt: skip
        lm = m["lm"]
        rows = [
            dict(
                way=LABELS[name],
                ms_per_token=med[name],
                ms_per_token_best=fastest[name],
                tokens_per_s=1e3 / med[name],
                vs_slow_off=ratio(med[name], med["slow_off"]),
                vs_cached=ratio(med[name], med["cached"]),
            )
            for name in NAMES
        ]
        tables.append(
            Table(
                title=f"Decode, {m['num_slow']} slow tokens, {shape} shape (hidden {lm.hidden_size}, {lm.num_layers} "
                f"layers, {lm.num_heads}/{lm.num_kv_heads} heads), {ctx.device_name}",
                columns=[
                    Column("way", "decoding"),
                    Column("ms_per_token", "ms / token (median)", "{:.2f}"),
                    Column("ms_per_token_best", "best", "{:.2f}"),
                    Column("tokens_per_s", "tokens / s", "{:.1f}"),
                    Column("vs_slow_off", "vs. slow path off", "{:.2f}x"),
                    Column("vs_cached", "vs. cached dynamic", "{:.2f}x"),
                ],
                rows=rows,
            )
        )
        target = TARGETS[shape]
        checks.append(
            Check(
                target=f"{shape}: cached decode within {target}x of slow path off (median)",
                measured=cached_vs_off,
                limit=target,
                met=cached_vs_off <= target,
                reading=f"cached {med['cached']:.2f} ms/token vs. slow path off {med['slow_off']:.2f} "
                f"({cached_vs_off:.2f}x); recomputing the slow keys/values every step costs "
                f"{med['recomputed'] / med['cached']:.2f}x the cached step; static compiled "
                f"{med['static_compiled']:.2f} ms/token ({med['static_compiled'] / med['cached']:.2f}x dynamic eager)",
            )
        )
        h, kv_dim = lm.hidden_size, lm.num_kv_heads * lm.head_dim
        recompute_flops = lm.hybrid_layers * 2 * m["num_slow"] * h * 2 * kv_dim
        equal = ", ".join(f"{name} {'yes' if same else 'NO'}" for name, same in m["equal"].items() if name != "cached")
        notes.append(
            f"{shape} shape (hidden {h}, {lm.num_layers} layers, {lm.hybrid_layers} hybrid, {lm.num_heads} heads / "
            f"{lm.num_kv_heads} kv heads) on {ctx.device_name}, {ctx.dtype_name}; {m['frames']} frames -> "
            f"{m['num_slow']} slow and {m['num_fast']} fast tokens, prompt of {m['positions']} positions; greedy, "
            f"{m['new_tokens']} timed decode steps after the first token; {timing_rule(ctx.repeats)} after a warm-up "
            f"run (ratios by median). Recomputing costs {recompute_flops / 1e9:.2f} GFLOPs per token here. "
            f"Slow keys/values read per step: {_bytes_per_step(lm, m['num_slow'], ctx.dtype)}. "
            f"Same greedy tokens as the cached dynamic run: {equal}."
        )
    notes.append(
        "A decode step has one query row per head; the cross-attention folds each group of query heads onto its "
        "key/value head (a [batch, kv_heads, group x rows, head_dim] query), so the stored slow keys/values are "
        "read once per key/value head and never copied to every query head, whatever the SDPA backend. At the "
        "released shape (bf16) " + _bytes_per_step(RELEASED, measured[shapes[0]]["num_slow"], torch.bfloat16) + "."
    )
    first = measured[shapes[0]]
    return BenchResult(
        name=NAME,
        title=TITLE,
        device=ctx.device_name,
        scale=ctx.scale,
        setup=dict(
            frames=first["frames"],
            slow_tokens=first["num_slow"],
            fast_tokens=first["num_fast"],
            prompt_positions=first["positions"],
            new_tokens=first["new_tokens"],
            shapes={shape: m["lm"].__dict__ for shape, m in measured.items()},
            dtype=ctx.dtype_name,
            repeats=ctx.repeats,
        ),
        tables=tables,
        summary=summary,
        checks=checks,
        notes=notes,
        seconds=time.perf_counter() - start,
    )
