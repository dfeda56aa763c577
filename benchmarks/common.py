"""What every benchmark shares: shapes, model builders, timing, peak-memory tracking and the result record.

Three scales:

* ``smoke``: the smallest shapes, for the test suite (seconds);
* ``small``: the default, sized so that each benchmark runs on a laptop CPU in about a minute;
* ``released``: the released checkpoint's shape (Qwen2-7B, ConvNeXt-XXL at 576 px) with random weights,
  for a GPU (bf16).
"""

from __future__ import annotations

import concurrent.futures
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from llava.constants import IMAGE_TOKEN_INDEX
from llava.model import LlavaQwenSlowFastConfig, LlavaQwenSlowFastForCausalLM, SlowFastParams, SlowFastTokens
from llava.model.slow_fast import split_slow_fast

SCALES = ("smoke", "small", "released")

# Text around the video in a prompt: the qwen_1_5 system prompt and user turn opening before <image>,
# a question and the assistant turn opening after it (about what the chat template produces).
TEXT_BEFORE = 14
TEXT_AFTER = 50


# --------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class LMShape:
    """Sizes of the Qwen2 language model; hybrid layers every ``cross_attn_every`` layers from layer 0."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    cross_attn_every: int
    max_positions: int = 32768
    rope_theta: float = 1_000_000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def hybrid_layers(self) -> int:
        return len(range(0, self.num_layers, self.cross_attn_every))


@dataclass(frozen=True)
class VisionShape:
    """A ConvNeXt tower: ``depths``/``dims`` per stage at ``image_size`` px (``image_size/32`` tokens per side)."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    image_size: int

    @property
    def grid(self) -> int:
        return self.image_size // 32


LM_SHAPES: dict[str, LMShape] = {
    "smoke": LMShape(256, 64, 128, 2, 4, 2, 1, max_positions=4096),
    "small": LMShape(4096, 512, 2048, 8, 8, 2, 4, max_positions=16384),
    # Qwen2-7B-Instruct: 28 layers, hidden 3584, 28 heads, 4 kv heads; hybrid layers 0, 8, 16, 24
    "released": LMShape(152064, 3584, 18944, 28, 28, 4, 8),
    # Qwen2-0.5B: 24 layers, hidden 896, 14 heads, 2 kv heads; hybrid layers 0, 8, 16 (a second CPU shape)
    "qwen2_0_5b": LMShape(151936, 896, 4864, 24, 14, 2, 8),
}
VISION_SHAPES: dict[str, VisionShape] = {
    "smoke": VisionShape((1, 1, 1, 1), (8, 16, 24, 32), 64),
    "small": VisionShape((1, 1, 3, 1), (32, 64, 128, 256), 192),
    # ConvNeXt-XXLarge (CLIP LAION-2B soup) at 576 px: 18 x 18 tokens of width 3072
    "released": VisionShape((3, 4, 30, 3), (384, 768, 1536, 3072), 576),
}
RELEASED = LM_SHAPES["released"]
RELEASED_VISION = VISION_SHAPES["released"]
RELEASED_GRID = RELEASED_VISION.grid  # 18


def lm_parameters(lm: LMShape) -> int:
    """Parameters of the language model: embeddings, decoder layers (with the hybrid layers' ``cross_attn_*``),
    final norm and ``lm_head`` (the vision tower and projector excluded)."""
    h, kv = lm.hidden_size, lm.num_kv_heads * lm.head_dim
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * lm.intermediate_size + 2 * h
    hybrid = (h * 2 * kv + 2 * kv) + (h + 1) + 1  # cross_attn_kv_proj, cross_attn_gate_proj, warm-up gate
    return 2 * lm.vocab_size * h + lm.num_layers * layer + lm.hybrid_layers * hybrid + h


def released_fast_params(num_frames: int) -> SlowFastParams:
    """The released recipe for ``num_frames`` frames: 2x2 video pooling, fast tokens pooled 4x in time with at
    least 16 fast frames; the 128-frame recipe also samples every 2nd frame (temporal sampling stride 2), so
    every recipe ends with 16 fast frames (1,296 fast tokens)."""
    return SlowFastParams(
        video_pooling_stride=2,
        temporal_sampling_stride=2 if num_frames > 64 else 1,
        temporal_stride=4,
        spatial_stride=1,
        min_fast_frames=16,
    )


def make_config(lm: LMShape, vision: VisionShape | None = None, **overrides: Any) -> LlavaQwenSlowFastConfig:
    """A Slow-Fast config with the released multimodal settings at the given sizes (``vision=None``: no tower)."""
    fields: dict[str, Any] = dict(
        vocab_size=lm.vocab_size,
        hidden_size=lm.hidden_size,
        intermediate_size=lm.intermediate_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_heads,
        num_key_value_heads=lm.num_kv_heads,
        max_position_embeddings=lm.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": lm.rope_theta},
        tie_word_embeddings=False,
        cross_attn_every_n_layers=lm.cross_attn_every,
        cross_attn_max_layer_depth=lm.num_layers,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    if vision is None:
        fields["mm_vision_tower"] = None
    elif vision != RELEASED_VISION:
        fields["mm_vision_tower_overrides"] = {
            "depths": list(vision.depths),
            "dims": list(vision.dims),
            "image_size": vision.image_size,
        }
    fields.update(overrides)
    return LlavaQwenSlowFastConfig(**fields)


def build_model(
    config: LlavaQwenSlowFastConfig, device: str | torch.device, dtype: torch.dtype = torch.float32, seed: int = 0
) -> LlavaQwenSlowFastForCausalLM:
    """A randomly initialised model built directly on ``device`` in ``dtype`` (``"meta"``: shapes only), eval mode."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaQwenSlowFastForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to(dtype)  # anything a submodule created with an explicit dtype
    return model.eval()


def prompt_ids(vocab_size: int, before: int = TEXT_BEFORE, after: int = TEXT_AFTER, seed: int = 0) -> torch.Tensor:
    """``[1, before + 1 + after]`` random text ids with the ``<image>`` placeholder (-200) after ``before`` ids."""
    generator = torch.Generator().manual_seed(seed)
    high = max(3, vocab_size - 1)
    text = torch.randint(2, high, (before + after,), generator=generator)
    return torch.cat([text[:before], torch.tensor([IMAGE_TOKEN_INDEX]), text[before:]])[None]


def random_visual_tokens(
    num_frames: int,
    grid: int,
    hidden: int,
    params: SlowFastParams,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> SlowFastTokens:
    """Slow and fast tokens of a ``num_frames`` video as the projector would give them (random features
    ``[T, grid^2, hidden]`` split with ``params``): slow ``[T * (grid/2)^2, hidden]``, fast ``[F, hidden]``."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(num_frames, grid * grid, hidden, generator=generator)
    tokens = split_slow_fast(features, params)
    return SlowFastTokens(fast=tokens.fast.to(device, dtype), slow=tokens.slow.to(device, dtype))


# --------------------------------------------------------------------------------------------- devices


def device_name(device: str | torch.device) -> str:
    """A human-readable name of the device: the GPU's name, or the CPU's model name from /proc/cpuinfo."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{model}, {os.cpu_count()} logical CPUs ({threads} torch thread{'' if threads == 1 else 's'})"


def synchronize(device: str | torch.device) -> None:
    """Wait for queued kernels on ``device`` (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: str | torch.device) -> float:
    """Wall seconds of one call of ``fn``, with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_contenders(
    contenders: dict[str, Callable[[], Any]], repeats: int, device: str | torch.device, warmup: int = 1
) -> dict[str, list[float]]:
    """Time each contender ``repeats`` times after ``warmup`` untimed calls, interleaved (A B C A B C ...) so
    that drift in the machine's load hits every contender alike. Returns seconds per call, per contender."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(time_call(fn, device))
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def best(values: list[float]) -> float:
    """The fastest of repeated timings: other work on the machine only ever adds time, so the minimum is the
    least disturbed reading (the tables use it; medians go to results.json beside it)."""
    return float(min(values))


def timing_rule(repeats: int) -> str:
    """How the timings were aggregated, for the notes."""
    return f"best of {repeats} timed runs (medians in results.json)"


# --------------------------------------------------------------------------------------------- memory


class LiveTensorTracker(TorchDispatchMode):
    """Counts the bytes of tensor storages created by ATen ops while active, and their peak.

    Each op's outputs whose storage is new (not one of the op's inputs and not already counted) are added; a
    weak reference on the storage subtracts them when it is freed. Tensors that existed before (weights,
    inputs) are not counted, so ``peak_bytes`` is the peak *above* what was live at the start. Scratch memory
    inside a single kernel (e.g. an attention kernel's workspace) is not seen. Works on any device, under
    autograd (backward ops on CPU run in the calling thread) and under ``torch.inference_mode``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.live_bytes -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if _has_storage(t)}
        out = func(*args, **kwargs)
        for tensor in tree_leaves(out):
            if not _has_storage(tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._sizes:
                continue
            size = storage.nbytes()
            self._sizes[key] = size
            self.live_bytes += size
            weakref.finalize(storage, self._release, key)
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


def _has_storage(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "meta" and not value.is_sparse


@dataclass
class MemoryReading:
    """Peak bytes above the bytes live before the call, how the number was obtained, and the call's result."""

    peak_bytes: int
    method: str
    result: Any = None


def peak_memory(fn: Callable[[], Any], device: str | torch.device) -> MemoryReading:
    """Run ``fn`` once and return the peak of memory allocated during it, above what was allocated before.

    CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's own count). CPU: a
    [`LiveTensorTracker`] (torch keeps no allocator statistics for CPU memory).
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        return MemoryReading(
            torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated", result
        )
    tracker = LiveTensorTracker()
    with tracker:
        result = fn()
    return MemoryReading(tracker.peak_bytes, "live ATen tensor storages (TorchDispatchMode)", result)


def tensor_bytes(value: Any) -> int:
    """Total bytes of the tensors in a (nested) result."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(value) if isinstance(t, torch.Tensor))


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


# --------------------------------------------------------------------------------------------- results


@dataclass
class Column:
    """One table column: the row key, its header, and a ``str.format`` spec for Markdown (e.g. ``"{:.2f}"``)."""

    key: str
    header: str
    fmt: str = "{}"


@dataclass
class Table:
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]]


@dataclass
class Check:
    """A target: ``measured`` against ``limit`` (``met`` when ``measured <= limit``, or ``>=`` if ``at_least``)."""

    target: str
    measured: float | None
    limit: float
    met: bool
    reading: str
    at_least: bool = False


@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float | None]
    style: str = "-o"


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    logx: bool = False
    logy: bool = False


@dataclass
class Figure:
    """A PNG of one or more panels side by side, written next to the results as ``file``."""

    file: str
    panels: list[Panel]


@dataclass
class BenchResult:
    """Everything one benchmark reports; ``summary`` holds the headline numbers (ratios, rates)."""

    name: str
    title: str
    device: str
    scale: str
    setup: dict[str, Any]
    tables: list[Table]
    summary: dict[str, float | None]
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["figures"] = [f.file for f in self.figures]
        return data


@dataclass
class RunContext:
    """Options shared by all benchmarks (from the command line)."""

    scale: str
    device: str
    dtype: torch.dtype
    repeats: int
    out_dir: Path
    cache_dir: Path
    log: Callable[[str], None] = print

    @property
    def device_name(self) -> str:
        return device_name(self.device)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def mib(num_bytes: float | None) -> float | None:
    return None if num_bytes is None else num_bytes / 2**20


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# ----------------------------------------------------------------------------------------------- request timing


def time_requests(mode: str, send: Callable[[Any], dict], requests: list) -> dict[str, Any]:
    """Send ``requests`` through ``send`` one at a time (``mode`` ending in ``sequential``) or all at once, and
    time them. ``send(request)`` returns ``{"ttft_s", "latency_s", "text", "tokens"}``; the row holds requests/s,
    tokens/s, time to first token and latency, and the texts."""
    start = time.perf_counter()
    if mode.endswith("sequential"):
        results = [send(request) for request in requests]
    else:
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(send, requests))
    wall = time.perf_counter() - start
    ttfts = [r["ttft_s"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "mode": mode,
        "requests": len(requests),
        "wall_s": wall,
        "requests_per_s": len(requests) / wall,
        "tokens_per_s": tokens / wall,
        "ttft_ms_mean": 1000 * statistics.fmean(ttfts),
        "ttft_ms_median": 1000 * statistics.median(ttfts),
        "ttft_ms_max": 1000 * max(ttfts),
        "latency_ms_mean": 1000 * statistics.fmean(r["latency_s"] for r in results),
        "generated_tokens": tokens,
        "texts": [r["text"] for r in results],
    }


def least_disturbed(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per mode: its run with the least wall time (texts dropped), with the medians over every run of
    requests/s and mean time to first token."""
    rows = []
    for results in runs.values():
        row = {k: v for k, v in min(results, key=lambda r: r["wall_s"]).items() if k != "texts"}
        row["requests_per_s_median"] = median([r["requests_per_s"] for r in results])
        row["ttft_ms_mean_median"] = median([r["ttft_ms_mean"] for r in results])
        rows.append(row)
    return rows
