"""Writing the results: ``results.json`` (merged with earlier runs of other benchmarks), ``results.md`` and PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .common import BenchResult, Figure

JSON_NAME = "results.json"
MARKDOWN_NAME = "results.md"


def load_results(out_dir: Path) -> dict[str, Any]:
    """The existing ``results.json`` in ``out_dir`` (``{"suite": ..., "benchmarks": {...}}``), or an empty one."""
    path = out_dir / JSON_NAME
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("benchmarks"), dict):
                return data
        except json.JSONDecodeError:
            pass
    return {"suite": {}, "benchmarks": {}}


def write_results(
    out_dir: Path, results: list[BenchResult], suite: dict[str, Any], order: list[str]
) -> dict[str, Path]:
    """Merge ``results`` into ``out_dir/results.json`` (replacing those benchmarks), draw their figures and
    rewrite ``results.md`` from the merged data. Returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_results(out_dir)
    for result in results:
        entry = result.to_json()
        entry["run"] = suite  # when, how and on what this entry was measured
        data["benchmarks"][result.name] = entry
    data["suite"] = suite
    data["benchmarks"] = {name: data["benchmarks"][name] for name in _ordered(data["benchmarks"], order)}
    paths = {"json": out_dir / JSON_NAME, "markdown": out_dir / MARKDOWN_NAME}
    paths["json"].write_text(json.dumps(_clean(data), indent=1) + "\n", encoding="utf-8")
    for result in results:
        for figure in result.figures:
            paths[figure.file] = draw_figure(figure, out_dir / figure.file)
    paths["markdown"].write_text(render_markdown(data), encoding="utf-8")
    return paths


def _ordered(entries: dict[str, Any], order: list[str]) -> list[str]:
    return [n for n in order if n in entries] + sorted(n for n in entries if n not in order)


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "n/a"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def render_markdown(data: dict[str, Any]) -> str:
    """A Markdown report of every benchmark in ``data``: device, tables, targets, notes and figures."""
    lines = ["# Benchmark results", ""]
    suite = data.get("suite", {})
    if suite:
        lines += [
            (
                f"Last run: `{suite.get('command', '')}` at {suite.get('date', '')} (torch {suite.get('torch', '')}, "
                f"transformers {suite.get('transformers', '')})."
            ),
            "",
        ]
    for name, entry in data["benchmarks"].items():
        run = entry.get("run", {})
        lines += [f"## {entry['title']} (`{name}`)", ""]
        lines += [
            (
                f"Device: **{entry['device']}**; scale `{entry['scale']}`; measured {run.get('date', '?')}; "
                f"took {entry['seconds']:.0f} s; load average before/after: {run.get('load_before', '?')} / "
                f"{run.get('load_after', '?')}."
            ),
            "",
        ]
        for table in entry["tables"]:
            lines += [f"**{table['title']}**", ""]
            headers = [c["header"] for c in table["columns"]]
            lines.append("| " + " | ".join(headers) + " |")
            lines.append("|" + "|".join("---" for _ in headers) + "|")
            for row in table["rows"]:
                cells = [_cell(row.get(c["key"]), c["fmt"]) for c in table["columns"]]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        if entry.get("checks"):
            lines += ["Targets:", ""]
            for check in entry["checks"]:
                verdict = "met" if check["met"] else "**missed**"
                lines.append(f"- {check['target']}: {verdict}. {check['reading']}.")
            lines.append("")
        if entry.get("notes"):
            lines += ["Notes:", ""] + [f"- {note}" for note in entry["notes"]] + [""]
        for file in entry.get("figures", []):
            lines += [f"![{name}]({file})", ""]
    return "\n".join(lines)


def draw_figure(figure: Figure, path: Path) -> Path:
    """Draw ``figure``'s panels side by side into a small PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(figure.panels), figsize=(5.2 * len(figure.panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], figure.panels, strict=True):
        for series in panel.series:
            points = [(x, y) for x, y in zip(series.x, series.y, strict=True) if y is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, series.style, label=series.label, markersize=4)
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel(panel.xlabel, fontsize=8)
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        if panel.logx:
            ax.set_xscale("log", base=2)
            ticks = sorted({x for series in panel.series for x in series.x})
            ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        if panel.logy:
            ax.set_yscale("log")
        ax.set_ylim(bottom=0 if not panel.logy else None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
