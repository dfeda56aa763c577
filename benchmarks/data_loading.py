"""Training data at scale: the memory of 2 ranks x N DataLoader workers over annotation files of 50k and 1M samples,
today's loader against the annotation store, and the start-up time of each.

Each configuration starts 2 "rank" processes (``benchmarks.data_rank``) together, as torchrun would: each builds
the training set, computes the lengths and plans the SFT recipe's order (length-grouped by modality), starts
its DataLoader workers (forked) and lets each load samples and run one full garbage collection (as the workers
of a long run eventually do), then waits. The parent then reads the proportional set size (PSS, from
``/proc/<pid>/smaps_rollup``: private pages plus each shared page divided by the processes sharing it) of every
process of both trees and sums it. The model is not built: only the data pipeline is measured (torch,
transformers and the tokenizer imported, as in a trainer).

Contenders: ``today``: the loader of commit 40b444f (:class:`benchmarks.data_rank.TodaysDataset`); ``store``: the
annotation store (:mod:`llava.train.store`), its cached lengths and ``gc.freeze`` before the workers fork, as
``SlowFastTrainer`` does; ``store_without_freeze``: the same without ``gc.freeze``, to show what each part buys. A contender whose processes together pass ``CAP_GB`` is stopped (it would take the
shared machine down) and reported as "exceeded". The first ``store`` configuration of each file starts from an
empty cache (its start-up builds the store and the lengths); the others find them built.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .common import BenchResult, Check, Column, RunContext, Table
from .data_rank import SYNTHETIC_FORMAT, tokenizer_dir, write_annotations

NAME = "data"
TITLE = "Training data at scale: memory of 2 ranks x DataLoader workers, today's loader vs. the annotation store"
BUILDS_RELEASED_MODEL = False


@dataclass(frozen=True)
class DataScale:
    sizes: tuple[int, ...]  # samples per annotation file
    workers: tuple[int, ...]
    samples_per_worker: int
    cap_gb: float  # both ranks' trees together
    loaders: tuple[str, ...] = ("today", "store_without_freeze", "store")


SCALES = {
    "smoke": DataScale((300,), (0, 1), 4, 4.0, ("today", "store")),
    "small": DataScale((50_000, 1_000_000), (0, 1, 4, 8), 32, 7.0),
    "released": DataScale((50_000, 1_000_000), (0, 1, 4, 8), 32, 7.0),
}
RANKS = 2
MAX_LENGTH = 4096
ADDRESS_SPACE_LIMIT = 24 << 30  # per rank process, a backstop behind the PSS cap
MIN_AVAILABLE = 2 << 30  # the machine's MemAvailable below which a run is stopped, whatever its own size


def memory_available() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (a large number where it cannot be read)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0
    return 0


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from ``/proc/<pid>/task/*/children``)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo.extend(int(child) for child in handle.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def run_ranks(spec: dict, cap_bytes: int, timeout: float = 1800) -> dict:
    """Start :data:`RANKS` rank processes with ``spec``; return their PSS once all are ready (``total``, ``mains``,
    ``workers``, ``startup_s``, ``peak``), or ``{"exceeded": peak}`` when together they passed ``cap_bytes``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(Path(__file__).parents[1]))
    processes, reports = [], [None] * RANKS
    for rank in range(RANKS):
        argument = json.dumps(dict(spec, rank=rank, world_size=RANKS))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "benchmarks.data_rank", argument], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env, start_new_session=True, preexec_fn=_limit_address_space, text=True,
        ))

    def read(rank: int) -> None:
        line = processes[rank].stdout.readline()
        reports[rank] = json.loads(line) if line.strip() else {}

    readers = [threading.Thread(target=read, args=(rank,), daemon=True) for rank in range(RANKS)]
    for reader in readers:
        reader.start()
    peak, started, outcome = 0, time.monotonic(), None
    try:
        while any(reader.is_alive() for reader in readers):
            total = sum(pss_bytes(p) for proc in processes for p in descendants(proc.pid))
            peak = max(peak, total)
            if total > cap_bytes or memory_available() < MIN_AVAILABLE:
                outcome = {"exceeded": peak}
                return outcome
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"the ranks did not get ready within {timeout:.0f} s")
            time.sleep(0.25)
        if any(not report for report in reports):
            codes = [proc.poll() for proc in processes]
            raise RuntimeError(f"a rank process failed (exit codes {codes}); run benchmarks.data_rank by hand to see why")
        mains = [pss_bytes(r["pid"]) for r in reports]
        workers = [pss_bytes(pid) for r in reports for pid in r["workers"]]
        total = sum(mains) + sum(workers)
        outcome = {"total": total, "mains": sum(mains), "workers": sum(workers), "peak": max(peak, total),
                   "startup_s": max(r["startup_s"] for r in reports)}
        return outcome
    finally:
        for proc in processes:
            try:
                if outcome is None or "exceeded" in outcome:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.stdin.close()
            except (ProcessLookupError, BrokenPipeError, OSError):
                pass
        for proc in processes:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def start_training(data_dir: Path, tokenizer: str, sources: list[Path], samples: int, cache: Path, workers: int,
                   cap_bytes: int, steps: int) -> dict:
    """``torchrun``: 2 processes train a tiny model for ``steps`` steps on a mixture of ``sources`` (``samples``
    samples in all) with ``workers`` DataLoader workers each (text only, DDP over gloo, the SFT recipe's order);
    returns the seconds to the first step, the PSS of the whole process tree at the first step and its peak."""
    import socket

    from transformers import AutoTokenizer

    from .common import LM_SHAPES, VISION_SHAPES, build_model, make_config

    root = data_dir / "trainer"
    checkpoint = root / "tiny"
    if not (checkpoint / "config.json").exists():
        vocab = len(AutoTokenizer.from_pretrained(tokenizer))
        model = build_model(make_config(LM_SHAPES["smoke"], VISION_SHAPES["smoke"], vocab_size=vocab), "cpu")
        model.save_pretrained(str(checkpoint))
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(str(checkpoint))
    first = sources[-1]
    ratio = (samples - sum(_count(s) for s in sources[:-1])) / _count(first)
    mixture = root / f"mixture-{samples}.yaml"
    entries = [f"  - annotation: {src}\n" for src in sources[:-1]] + [f"  - annotation: {first}\n    ratio: {ratio:.6f}\n"]
    mixture.write_text("seed: 0\nsources:\n" + "".join(entries))
    out = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS), "--master_port", str(port),
        "-m", "llava.train.train", "--model_name_or_path", str(checkpoint), "--data_path", str(mixture),
        "--is_multimodal", "False", "--data_cache_dir", str(cache), "--output_dir", str(out), "--use_cpu", "True",
        "--ddp_backend", "gloo", "--max_steps", str(steps), "--per_device_train_batch_size", "1",
        "--gradient_accumulation_steps", "2", "--group_by_modality_length", "True",
        "--dataloader_num_workers", str(workers), "--model_max_length", str(MAX_LENGTH), "--save_strategy", "no",
        "--logging_steps", "1", "--report_to", "none", "--video_frames", "4", "--min_fast_frames", "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(Path(__file__).parents[1]))
    log = open(out / "train.log", "w")
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    peak, at_first, first_step = 0, None, None
    try:
        while process.poll() is None:
            total = sum(pss_bytes(p) for p in descendants(process.pid))
            peak = max(peak, total)
            if total > cap_bytes or memory_available() < MIN_AVAILABLE:
                return {"exceeded": peak}
            if first_step is None and "'loss'" in (out / "train.log").read_text(errors="replace"):
                first_step, at_first = time.monotonic() - started, total
            time.sleep(0.5)
        if process.returncode != 0 or first_step is None:
            tail = (out / "train.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the training run failed (exit {process.returncode}):\n{tail}")
        return {"first_step_s": first_step, "pss_at_first_step": at_first, "peak": peak,
                "seconds": time.monotonic() - started}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        shutil.rmtree(out, ignore_errors=True)


def _count(path: Path) -> int:
    """Samples in one of the synthetic files (from its name)."""
    return int(path.stem.rsplit("-", 1)[1])


def _gb(num_bytes: float | None) -> float | None:
    return None if num_bytes is None else num_bytes / 2**30


def run(ctx: RunContext) -> BenchResult:
    """Measure every (file size, loader, workers) configuration; report PSS, start-up and the targets."""
    started = time.perf_counter()
    scale = SCALES[ctx.scale]
    data_dir = Path(ctx.cache_dir) / f"data-v{SYNTHETIC_FORMAT}"
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = str(tokenizer_dir(data_dir))
    cap = int(scale.cap_gb * 2**30)
    rows, by_key, first_build = [], {}, {}
    caches: dict[int, Path] = {}
    try:
        for size in scale.sizes:
            t0 = time.perf_counter()
            path = write_annotations(data_dir / f"annotations-{size}.json", size)
            file_bytes = path.stat().st_size
            ctx.log(f"  {size} samples: {file_bytes / 2**20:.0f} MiB JSON ({time.perf_counter() - t0:.0f} s to write or find)")
            store_cache = caches[size] = Path(tempfile.mkdtemp(prefix="store-", dir=data_dir))
            if True:
                for loader in scale.loaders:
                    exceeded = None
                    for workers in scale.workers:
                        row = dict(samples=size, file_mib=file_bytes / 2**20, loader=loader, workers=workers)
                        if exceeded is not None:  # more workers only add to it
                            row.update(status=f"not run (exceeded {scale.cap_gb:g} GB with fewer workers)")
                            rows.append(row)
                            continue
                        spec = dict(loader=loader, data=str(path), cache=str(store_cache), tokenizer=tokenizer,
                                    workers=workers, samples_per_worker=scale.samples_per_worker, max_length=MAX_LENGTH)
                        result = run_ranks(spec, cap, timeout=3600)
                        if "exceeded" in result:
                            exceeded = result["exceeded"]
                            row.update(status=f"exceeded {scale.cap_gb:g} GB (stopped at {_gb(exceeded):.1f} GB)")
                        else:
                            row.update(status="ok", total_gb=_gb(result["total"]), mains_gb=_gb(result["mains"]),
                                       workers_gb=_gb(result["workers"]), peak_gb=_gb(result["peak"]),
                                       startup_s=result["startup_s"])
                            by_key[(size, loader, workers)] = row
                            if loader.startswith("store") and size not in first_build:
                                first_build[size] = result["startup_s"]
                                row["status"] = "ok (built the store and lengths)"
                        ctx.log(f"  {size:>8} {loader:5s} x{workers}: {row['status']}"
                                + (f", {row['total_gb']:.2f} GB, start-up {row['startup_s']:.1f} s" if "total_gb" in row else ""))
                        rows.append(row)
        paths = [data_dir / f"annotations-{size}.json" for size in scale.sizes]
        training = start_training(data_dir, tokenizer, paths, scale.sizes[-1], caches[scale.sizes[-1]],
                                  scale.workers[min(2, len(scale.workers) - 1)], cap, steps=3)
    finally:
        for folder in caches.values():
            shutil.rmtree(folder, ignore_errors=True)
    small, large = scale.sizes[0], scale.sizes[-1]
    fewest, most = scale.workers[0], scale.workers[-1]

    def total(size, loader, workers):
        row = by_key.get((size, loader, workers))
        return row["total_gb"] if row else None

    # the target counts worker processes: from none to 8 in all, i.e. 4 per rank with 2 ranks
    target_workers = next((w for w in scale.workers if w * RANKS >= 8), most)
    growth_workers = _ratio(total(large, "store", target_workers), total(large, "store", fewest))
    growth_most = _ratio(total(large, "store", most), total(large, "store", fewest))
    grow_size = total(large, "store", most), total(small, "store", most)
    size_growth_gb = grow_size[0] - grow_size[1] if None not in grow_size else None
    file_growth_gb = (Path(data_dir / f"annotations-{large}.json").stat().st_size
                      - Path(data_dir / f"annotations-{small}.json").stat().st_size) / 2**30
    summary = {
        "store_total_gb_large_most_workers": total(large, "store", most),
        "store_total_gb_large_no_workers": total(large, "store", fewest),
        "store_growth_to_8_worker_processes": growth_workers,
        "store_growth_fewest_to_most_workers": growth_most,
        "store_growth_small_to_large_gb": size_growth_gb,
        "file_growth_small_to_large_gb": file_growth_gb,
        "store_startup_first_s": first_build.get(large),
        "store_startup_cached_s": by_key.get((large, "store", most), {}).get("startup_s"),
        "today_total_gb_small_no_workers": total(small, "today", fewest),
        "today_total_gb_small_most_workers": total(small, "today", most),
    }
    training_row = dict(samples=scale.sizes[-1], workers=scale.workers[min(2, len(scale.workers) - 1)])
    if "exceeded" in training:
        training_row["status"] = f"exceeded {scale.cap_gb:g} GB (stopped at {_gb(training['exceeded']):.1f} GB)"
    else:
        training_row.update(status="trained 3 steps", first_step_s=training["first_step_s"],
                            pss_gb=_gb(training["pss_at_first_step"]), peak_gb=_gb(training["peak"]))
        summary.update(train_first_step_s=training["first_step_s"], train_peak_gb=_gb(training["peak"]))
    checks = []
    if growth_workers is not None:
        checks.append(Check(
            f"store: total PSS from {fewest} to {target_workers * RANKS} worker processes ({target_workers} per rank, "
            f"{large} samples) grows < 10 %", growth_workers, 1.10, growth_workers <= 1.10, f"{growth_workers:.3f}x",
        ))
    if size_growth_gb is not None and small != large:
        checks.append(Check(
            f"store: growth from {small} to {large} samples well below the file's growth ({file_growth_gb:.2f} GB)",
            max(size_growth_gb, 1e-9), 0.25 * file_growth_gb, size_growth_gb <= 0.25 * file_growth_gb,
            f"{size_growth_gb:.2f} GB",
        ))
    columns = [
        Column("samples", "samples"), Column("file_mib", "file MiB", "{:.0f}"), Column("loader", "loader"),
        Column("workers", "workers / rank"), Column("total_gb", "total PSS GB", "{:.2f}"),
        Column("mains_gb", "ranks GB", "{:.2f}"), Column("workers_gb", "workers GB", "{:.2f}"),
        Column("peak_gb", "peak GB", "{:.2f}"), Column("startup_s", "start-up s", "{:.1f}"), Column("status", "status"),
    ]
    notes = [
        f"{RANKS} rank processes started together, each with 0..{most} forked DataLoader workers; every worker loads "
        f"{scale.samples_per_worker} samples (tokenised as in training; is_multimodal=False, so no media is opened) "
        "and runs one full garbage collection; then the PSS of every process is read from /proc/<pid>/smaps_rollup "
        "and summed. No model is built.",
        "Synthetic JSON-list files after LLaVA-Video SFT's mix: 60 % video samples (20-400 words), 20 % images "
        "(20-200), 20 % text only (50-1,500); a tiny BPE tokenizer trained on the words (about a token a word).",
        "today: the loader of commit 40b444f (whole file parsed into dicts in each rank, lengths by one tokenizer "
        "call over every turn). store: the annotation store (memory-mapped Arrow, shared through the page cache), "
        "lengths computed once and memory-mapped, gc.freeze() before the workers fork (store_without_freeze: the "
        "same without it: a worker's garbage collection then copies the pages of every object it inherited).",
        f"Start-up: building the training set and its lengths in a rank (the slower of the two). The first store "
        f"configuration of each file starts from an empty cache (one rank builds, the other waits for it); later "
        f"ones open what it built. A contender passing {scale.cap_gb:g} GB for both ranks together is stopped.",
        "Training: python -m torch.distributed.run --nproc_per_node 2 -m llava.train.train on a mixture of the files "
        f"({scale.sizes[-1]} samples), a tiny random model, --group_by_modality_length, DDP over gloo, text only "
        "(the synthetic media do not exist); seconds from the launch to the first logged step (the stores and "
        "lengths already built, the mixture's draws not), PSS of torchrun and everything below it.",
    ]
    return BenchResult(
        name=NAME,
        title=TITLE,
        device="cpu (data pipeline only)",
        scale=ctx.scale,
        setup=dict(sizes=list(scale.sizes), workers=list(scale.workers), ranks=RANKS,
                   samples_per_worker=scale.samples_per_worker, cap_gb=scale.cap_gb, max_length=MAX_LENGTH),
        tables=[
            Table(title="PSS of 2 ranks and their DataLoader workers", columns=columns, rows=rows),
            Table(
                title="Training starts on the largest set (a mixture): torchrun, 2 processes, the tiny model",
                columns=[Column("samples", "samples"), Column("workers", "workers / rank"),
                         Column("first_step_s", "s to first step", "{:.0f}"),
                         Column("pss_gb", "PSS at first step GB", "{:.2f}"), Column("peak_gb", "peak GB", "{:.2f}"),
                         Column("status", "status")],
                rows=[training_row],
            ),
        ],
        summary=summary,
        checks=checks,
        notes=notes,
        seconds=time.perf_counter() - started,
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b
