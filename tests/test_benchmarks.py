"""Smoke test of the benchmark suite: ``python -m benchmarks --smoke`` writes its JSON, Markdown and PNGs.

No timing is asserted: only that every benchmark ran and reported finite, positive numbers.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.run import BENCHMARKS, main

HEADLINES = {
    "prefill": ["slow_fast_flops_growth", "slow_fast_last_vs_baseline_first", "slow_fast_vs_baseline_wall_at_last"],
    "decode": ["ms_per_token_cached", "ms_per_token_recomputed", "ms_per_token_slow_off", "cached_vs_slow_off"],
    "vision": ["chunked_peak_growth", "chunked_above_output_growth", "chunked_fps_at_last", "all_at_once_fps_at_last"],
    "video": [
        "decord_seconds",
        "pyav_seconds",
        "sequential_seconds",
        "decord_sampled_fps",
        "pyav_speedup_vs_sequential",
    ],
    "train": [
        "tokens_per_s_none",
        "tokens_per_s_default",
        "tokens_per_s_lm_only",
        "peak_mib_none",
        "peak_mib_default",
        "peak_default_vs_none",
        "packed_real_tokens_per_s",
        "batch1_real_tokens_per_s",
        "packed_vs_batch1_speed",
        "packed_peak_mib",
    ],
    "data": [
        "store_total_gb_large_most_workers",
        "store_growth_fewest_to_most_workers",
        "store_growth_to_8_worker_processes",
        "store_startup_first_s",
        "today_total_gb_small_no_workers",
    ],
    "serve": ["sequential_requests_per_s", "concurrent_requests_per_s", "sequential_ttft_ms", "concurrent_ttft_ms"],
}
ROW_NUMBERS = {
    "prefill": ["tflops_slow_fast", "tflops_baseline", "tflops_vision", "ms_slow_fast", "ms_baseline"],
    "decode": ["ms_per_token", "tokens_per_s"],
    "vision": ["chunked_peak_mib", "all_at_once_peak_mib", "chunked_fps", "all_at_once_fps"],
    "video": ["seconds", "sampled_fps"],
    "train": ["seconds_per_step", "tokens_per_s", "peak_mib", "real_tokens_per_s"],
    "data": ["file_mib", "total_gb", "startup_s"],
    "serve": ["requests_per_s", "tokens_per_s", "ttft_ms_mean", "wall_s"],
}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    args = ["--smoke", "--repeats", "1", "--device", "cpu", "--out", str(out / "results")]
    args += ["--cache-dir", str(out / "cache")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the smoke shapes are tiny: one thread keeps the test quick on a busy machine
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    return out / "results"


def test_writes_json_with_every_benchmark(smoke_run: Path) -> None:
    data = json.loads((smoke_run / "results.json").read_text())
    assert list(data["benchmarks"]) == list(BENCHMARKS)
    assert data["suite"]["scale"] == "smoke"
    for name, entry in data["benchmarks"].items():
        assert entry["device"] and entry["scale"] == "smoke"
        for key in HEADLINES[name]:
            assert _positive(entry["summary"][key]), (name, key, entry["summary"].get(key))
        rows = [row for table in entry["tables"] for row in table["rows"]]
        assert rows, name
        for key in ROW_NUMBERS[name]:
            values = [row[key] for row in rows if key in row]
            assert values and all(_positive(v) for v in values), (name, key, values)
        for check in entry["checks"]:
            assert isinstance(check["met"], bool) and _positive(check["measured"])


def test_counted_flops_match_the_analytic_count(smoke_run: Path) -> None:
    summary = json.loads((smoke_run / "results.json").read_text())["benchmarks"]["prefill"]["summary"]
    assert summary["counted_vs_analytic"] == pytest.approx(1.0, rel=1e-3)


def test_meta_flop_count_matches_the_unmodified_code_on_real_tensors(smoke_run: Path) -> None:
    entry = json.loads((smoke_run / "results.json").read_text())["benchmarks"]["prefill"]
    assert entry["summary"]["meta_vs_device_count"] == pytest.approx(1.0, rel=1e-9)
    # only the text positions cross-attend, so the counted prefill is below the every-position figure
    for row in entry["tables"][0]["rows"]:
        assert row["querying_positions"] < row["seq_slow_fast"]
        assert row["tflops_slow_fast"] < row["tflops_slow_fast_all_positions"]


def test_train_contenders_checkpoint_what_their_labels_say(smoke_run: Path) -> None:
    flags = json.loads((smoke_run / "results.json").read_text())["benchmarks"]["train"]["setup"]["checkpointed"]
    assert flags["none"]["lm_layers"] == 0 and flags["none"]["tower_stages"] == 0
    assert flags["default"]["lm_layers"] == flags["default"]["lm_layers_total"] > 0
    assert flags["default"]["tower_stages"] == flags["default"]["tower_stages_total"] > 0
    assert flags["lm_only"]["lm_layers"] == flags["lm_only"]["lm_layers_total"]
    assert flags["lm_only"]["tower_stages"] == 0


def test_writes_markdown_and_plots(smoke_run: Path) -> None:
    markdown = (smoke_run / "results.md").read_text()
    for name, module in BENCHMARKS.items():
        assert f"## {module.TITLE} (`{name}`)" in markdown
    assert markdown.count("|---") >= len(BENCHMARKS)
    for png in ("prefill.png", "vision.png"):
        assert (smoke_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in markdown


def test_only_refreshes_one_entry_and_keeps_the_others(smoke_run: Path) -> None:
    before = json.loads((smoke_run / "results.json").read_text())["benchmarks"]
    cache = smoke_run.parent / "cache"
    assert (
        main(["--smoke", "--only", "video", "--device", "cpu", "--out", str(smoke_run), "--cache-dir", str(cache)]) == 0
    )
    after = json.loads((smoke_run / "results.json").read_text())["benchmarks"]
    assert list(after) == list(before)
    assert after["train"] == before["train"]
    assert _positive(after["video"]["summary"]["decord_seconds"])
