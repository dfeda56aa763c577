"""The benchmark suite's entry point: ``python -m benchmarks [--only NAME] [--out DIR] [--released-shape] ...``.

Runs each benchmark, then writes ``results.json`` (merged with the entries already in ``--out``, so ``--only``
refreshes some without losing the others), ``results.md`` and the PNG figures into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from . import data_loading, decode, prefill, serve, train_step, video_decode, vision
from .common import BenchResult, RunContext
from .report import write_results

BENCHMARKS: dict[str, ModuleType] = {
    prefill.NAME: prefill,
    decode.NAME: decode,
    vision.NAME: vision,
    video_decode.NAME: video_decode,
    train_step.NAME: train_step,
    data_loading.NAME: data_loading,
    serve.NAME: serve,
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slowfast-llava-benchmarks"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the Slow-Fast benchmarks; write results.json, results.md and PNG plots into --out.",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only these benchmarks (repeat or comma-separate): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument(
        "--released-shape",
        action="store_true",
        help="build models at the released shape (Qwen2-7B, ConvNeXt-XXL at 576 px) with random weights; needs a GPU",
    )
    scale.add_argument("--smoke", action="store_true", help="the smallest shapes and counts (for tests)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, float32 on CPU"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repetitions per measurement (default 3; smoke 1)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"where the rendered test video is kept (default {DEFAULT_CACHE})",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser.parse_args(argv)


def selected(only: list[str] | None) -> list[str]:
    """Benchmark names from ``--only`` values (each may be comma-separated), in the suite's order."""
    if not only:
        return list(BENCHMARKS)
    names = {name.strip() for value in only for name in value.split(",") if name.strip()}
    unknown = sorted(names - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    return [name for name in BENCHMARKS if name in names]


def make_context(args: argparse.Namespace, names: list[str]) -> RunContext:
    """Resolve the device, dtype, scale and repeat count; refuse the released shape's models without a GPU."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine")
    scale = "released" if args.released_shape else "smoke" if args.smoke else "small"
    heavy = [name for name in names if BENCHMARKS[name].BUILDS_RELEASED_MODEL]
    if scale == "released" and torch.device(device).type != "cuda" and heavy:
        raise SystemExit(
            f"--released-shape: {', '.join(heavy)} build the 8.5 B-parameter model and need a GPU; on a CPU run the "
            "default small shape (the prefill FLOPs are always counted at the released shape, on the meta device)"
        )
    dtype_name = args.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    repeats = args.repeats if args.repeats is not None else (1 if scale == "smoke" else 3)
    if repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    return RunContext(
        scale=scale,
        device=device,
        dtype=getattr(torch, dtype_name),
        repeats=repeats,
        out_dir=args.out,
        cache_dir=args.cache_dir,
        log=lambda message: print(message, flush=True),
    )


def _load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks and write their results; returns the exit status."""
    args = parse_args(argv)
    if args.list:
        for name, module in BENCHMARKS.items():
            print(f"{name:8s} {module.TITLE}")
        return 0
    names = selected(args.only)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    ctx = make_context(args, names)
    import transformers

    suite = {
        "command": "python -m benchmarks " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": ctx.device_name,
        "scale": ctx.scale,
        "dtype": ctx.dtype_name,
        "repeats": ctx.repeats,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_before": _load(),
    }
    ctx.log(
        f"benchmarks {names} at the {ctx.scale} shape on {ctx.device_name} ({ctx.dtype_name}), {ctx.repeats} repeats"
    )
    results: list[BenchResult] = []
    start = time.perf_counter()
    for name in names:
        ctx.log(f"[{name}] {BENCHMARKS[name].TITLE}")
        result = BENCHMARKS[name].run(ctx)
        ctx.log(f"[{name}] done in {result.seconds:.1f} s")
        results.append(result)
    suite["load_after"] = _load()
    suite["seconds"] = round(time.perf_counter() - start, 1)
    paths = write_results(ctx.out_dir, results, suite, list(BENCHMARKS))
    ctx.log(f"wrote {', '.join(str(p) for p in paths.values())} in {suite['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
