"""The slow-fast ablation on the synthetic task: does the slow path recover what the fast tokens lose?

    python -m playground.ablation [--work checkpoints/ablation] [--out assets/ablation]

Six tiny models are trained with ``scripts/tiny/train_tiny.sh`` (same videos, same pretrained tower, same
base, same optimiser and batch; the first five for the same number of steps). The first four ask each training
video a few questions and differ only in how the video reaches the language model:

* ``slowfast`` -- 64 pooled fast tokens in the language model, all 256 slow tokens through hybrid layers
  (the published architecture);
* ``fast`` -- the same 64 fast tokens, no hybrid layers: the same token budget in the language model;
* ``slow`` -- all 256 slow tokens in the language model as ordinary tokens, no hybrid layers (the
  self-attention-only baseline);
* ``positions`` -- slow-fast whose slow tokens also carry their frame's time and their row and column
  (``--slow_token_position_encoding fourier_spacetime``) and are the tower's full 8 x 8 grid (1,024 slow tokens
  instead of 256; the same 64 fast tokens).

The fifth, ``recipe``, is ``positions`` with two changes, each measured on its own in playground/README.md (runs 23
and 24): the hybrid layers query the slow tokens with a projection of their own (``--cross_attn_query_source
own``), and the training split asks every question of each video. The sixth, ``refined``, is train_tiny.sh's
default and the recipe of ``assets/tiny-slowfast``: ``recipe``, then a second fine-tuning stage from its weights
on training videos that are also asked which shape has each colour, most of them with a flash (run 38).

Each is scored on the test split per question family (``playground.evaluate_synthetic``), and its prefill
is measured on the test videos: the tokens the language model reads, the slow tokens it cross-attends to,
and the wall time of the language model's prefill (the video already encoded; every variant encodes the
same frames with the same tower). The results go to ``OUT/ablation.json``, ``OUT/ablation.md`` and
``OUT/ablation.png``. Stages already done (a trained variant, its test score) are reused, so a stopped run
resumes; ``--report-only`` redraws from what is there, and ``--merge`` keeps the rows of ``OUT/ablation.json``
for the variants not named in ``--variants`` (to add one variant without training the others again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import tokenizer_image_token
from llava.video import load_video
from playground.evaluate_synthetic import FAMILY_ANSWERS, load_questions
from playground.synthetic_data import COLORS, plan_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "scripts" / "tiny" / "train_tiny.sh"
VARIANTS: dict[str, str] = {
    "slowfast": "(a) slow-fast",
    "fast": "(b) fast tokens only",
    "slow": "(c) all slow tokens in the LM",
    "positions": "(d) slow-fast, full-grid slow tokens with positions",
    "recipe": "(e) (d) with its own query, every question asked",
    "refined": "(f) (e), then refined on shape and flash questions",
}
# How each variant is trained: train_tiny.sh's settings. (a) to (d) ask each training video a few questions
# (QUESTIONS=sampled) and query the slow tokens the published way (CROSS_ATTN_QUERY=self_attn); (a) to (e) train
# one stage (REFINE_STEPS=0); (f) is the script's defaults, the recipe of assets/tiny-slowfast.
_PUBLISHED = {"QUESTIONS": "sampled", "CROSS_ATTN_QUERY": "self_attn", "REFINE_STEPS": "0"}
_RECIPE = {"VARIANT": "slowfast", "SLOW_POSITIONS": "fourier_spacetime", "SLOW_POOLING": "1", "QUESTIONS": "all",
           "CROSS_ATTN_QUERY": "own"}  # fmt: skip
RECIPES: dict[str, dict[str, str]] = {
    "slowfast": {"VARIANT": "slowfast", "SLOW_POSITIONS": "none", "SLOW_POOLING": "2", **_PUBLISHED},
    "fast": {"VARIANT": "fast", "SLOW_POSITIONS": "none", "SLOW_POOLING": "2", **_PUBLISHED},
    "slow": {"VARIANT": "slow", "SLOW_POSITIONS": "none", "SLOW_POOLING": "2", **_PUBLISHED},
    "positions": {"VARIANT": "slowfast", "SLOW_POSITIONS": "fourier_spacetime", "SLOW_POOLING": "1", **_PUBLISHED},
    "recipe": {**_RECIPE, "REFINE_STEPS": "0"},
    "refined": {**_RECIPE, "REFINE_STEPS": "2000", "REFINE_QUESTIONS": "all_shape_flash", "REFINE_FLASH_RATE": "0.75"},
}
FAMILY_LABELS: dict[str, str] = {
    "video_color": "colour",
    "video_direction": "direction",
    "video_count": "count",
    "video_first": "first",
    "video_flash": "flash (detail)",
}


def train_variant(variant: str, work: Path, port: int) -> Path:
    """Run the recipe for ``variant`` (a no-op for the stages already done); returns its checkpoint folder."""
    out = work / variant
    env = dict(os.environ, **RECIPES[variant], WORK=str(work / "shared"), PYTHON=sys.executable, MASTER_PORT=str(port))
    subprocess.run(["bash", str(TRAIN_SCRIPT), str(out)], check=True, env=env, cwd=REPO_ROOT)
    return out


@torch.no_grad()
def measure_prefill(model_path: Path, data_dir: Path, videos: int = 8, repeats: int = 5) -> dict[str, Any]:
    """Prefill cost of one video question: LM tokens, slow tokens, LM prefill and video encoding times.

    For each of the first ``videos`` test videos the video is encoded once, then the language model's prefill
    (one forward over the prompt with the fast tokens merged in, logits of the last position only) is timed
    ``repeats`` times; the fastest reading per video is kept (other work on the machine only adds time) and the
    median over videos reported.
    """
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(str(model_path), device="cpu", torch_dtype="float32")
    frames = model.config.video_frames
    questions = load_questions(data_dir, "test")
    seen: dict[str, str] = {}
    for q in questions:
        seen.setdefault(q.video, q.question)
        if len(seen) == videos:
            break
    lm_ms, encode_ms, lm_tokens, slow_tokens = [], [], [], []
    for video, question in seen.items():
        clip = load_video(video, frames)
        pixels = processor.preprocess(clip.frames, return_tensors="pt")["pixel_values"]
        conv = conv_templates["qwen_1_5"].copy()
        conv.append_message(conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\n{question}")
        conv.append_message(conv.roles[1], None)
        ids = torch.tensor([tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX)])
        mask = torch.ones_like(ids)
        start = time.perf_counter()
        tokens = model.encode_images([pixels])
        encode_ms.append(1000 * (time.perf_counter() - start))
        mm = model.prepare_multimodal_inputs(ids, mask, None, None, visual_tokens=tokens)
        lm_tokens.append(mm.inputs_embeds.shape[1])
        slow_tokens.append(mm.num_slow_tokens[0] if model.hybrid_layers else 0)

        def prefill() -> None:
            model(
                inputs_embeds=mm.inputs_embeds, attention_mask=mm.attention_mask, position_ids=mm.position_ids,
                slow_tokens=mm.slow_tokens, slow_token_mask=mm.slow_token_mask,
                cross_attn_query_mask=mm.cross_attn_query_mask, logits_to_keep=1, use_cache=True,
            )

        prefill()  # warm-up
        readings = []
        for _ in range(repeats):
            start = time.perf_counter()
            prefill()
            readings.append(time.perf_counter() - start)
        lm_ms.append(1000 * min(readings))
    return {
        "lm_prefill_tokens": int(_median(lm_tokens)),
        "cross_attended_slow_tokens": int(_median(slow_tokens)),
        "lm_prefill_ms": _median(lm_ms),
        "video_encode_ms": _median(encode_ms),
        "videos": len(seen),
        "repeats": repeats,
    }


def flash_informed_guess(data_dir: Path, split: str = "test", seed: int = 2, size: int = 64, frames: int = 16) -> float:
    """Accuracy (%) of answering each flash question with a random colour that no shape in the video has.

    The flash never takes a shape's colour, so this, not one in five, is what a model reaches that sees the
    shapes but not the mark. The split is planned again (plans are deterministic: ``seed``, ``size`` and
    ``frames`` as in ``scripts/tiny/train_tiny.sh``) and checked against ``split.json`` question by question.
    """
    records = [r for r in json.loads((Path(data_dir) / f"{split}.json").read_text()) if "video" in r]
    plan = plan_dataset(num_videos=len({r["video"] for r in records}), num_images=0, num_text=0, size=size,
                        frames=frames, seed=seed, split=split)  # fmt: skip
    guesses = []
    for record, sample in zip(records, plan.samples, strict=True):
        answers = [turn["value"] for turn in record["conversations"][1::2]]
        if record["video"] != plan.video_path(sample.media_index) or answers != [t.answer for t in sample.turns]:
            raise ValueError(f"{data_dir}/{split}.json: {record['id']} is not the planned split (seed {seed})")
        used = {shape.color for shape in plan.videos[sample.media_index].shapes}
        guesses += [1 / (len(COLORS) - len(used)) for t in sample.turns if t.family == "video_flash"]
    return 100 * sum(guesses) / max(len(guesses), 1)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return float(ordered[mid]) if len(ordered) % 2 else float((ordered[mid - 1] + ordered[mid]) / 2)


def render_markdown(results: dict[str, Any]) -> str:
    """The README table: accuracy per family (chance in the header), LM prefill tokens and time."""
    variants = results["variants"]
    chance = results["chance"]
    head = ["model"] + [f"{FAMILY_LABELS[f]} (chance {chance[f]:.0f} %)" for f in FAMILY_LABELS] + [
        "LM prefill tokens", "cross-attended slow tokens", "LM prefill (ms)"
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in variants.items():
        accs = [f"{r['accuracy'][f]:.1f} %" if f in r["accuracy"] else "-" for f in FAMILY_LABELS]
        p = r["prefill"]
        row = [VARIANTS[name]] + accs + [str(p["lm_prefill_tokens"]), str(p["cross_attended_slow_tokens"]),
                                          f"{p['lm_prefill_ms']:.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    if "flash_informed_guess" in results:
        lines.append(f"\nNaming a colour that no shape has gives {results['flash_informed_guess']:.1f} % on the flash.")
    return "\n".join(lines) + "\n"


def draw_plot(results: dict[str, Any], path: Path) -> None:
    """Grouped bars of test accuracy per family (chance dashed), and LM prefill tokens and time per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    families = list(FAMILY_LABELS)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5.0), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / len(variants)
    colors = {"slowfast": "#1f77b4", "fast": "#ff7f0e", "slow": "#2ca02c", "positions": "#d62728", "recipe": "#9467bd",
              "refined": "#8c564b"}
    for k, (name, r) in enumerate(variants.items()):
        xs = [i + (k - (len(variants) - 1) / 2) * width for i in range(len(families))]
        ys = [r["accuracy"].get(f, 0.0) for f in families]
        ax.bar(xs, ys, width, label=VARIANTS[name], color=colors.get(name))
    for i, f in enumerate(families):
        ax.hlines(results["chance"][f], i - 0.45, i + 0.45, colors="black", linestyles="dashed", linewidth=1)
    if "flash_informed_guess" in results:
        i = families.index("video_flash")
        ax.hlines(results["flash_informed_guess"], i - 0.45, i + 0.45, colors="gray", linestyles="dotted", linewidth=1.5)
        ax.annotate("no shape's colour", (i, results["flash_informed_guess"]), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=7, color="gray")  # fmt: skip
    ax.set_xticks(range(len(families)), [FAMILY_LABELS[f] for f in families])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy per question family (dashed: chance)")
    # below the axes: with six variants a legend inside covers bars
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, fontsize=8, frameon=False)

    names = list(variants)
    tokens = [variants[n]["prefill"]["lm_prefill_tokens"] for n in names]
    times = [variants[n]["prefill"]["lm_prefill_ms"] for n in names]
    bars = bx.bar(range(len(names)), tokens, color=[colors.get(n) for n in names])
    for bar, ms in zip(bars, times):
        bx.annotate(f"{ms:.1f} ms", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    bx.set_xticks(range(len(names)), [VARIANTS[n].split(" ", 1)[0] for n in names])
    bx.set_ylabel("LM prefill tokens")
    bx.set_title("Prefill: tokens (bars), time (labels)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect(work: Path, variants: list[str]) -> dict[str, Any]:
    """Read each variant's test score and measure its prefill."""
    data_dir = work / "shared" / "data"
    out: dict[str, Any] = {}
    for name in variants:
        ckpt = work / name
        score = json.loads((ckpt / "eval_test.json").read_text())
        out[name] = {
            "checkpoint": str(ckpt),
            "accuracy": {f: r["accuracy"] for f, r in score["families"].items()},
            "questions": {f: r["questions"] for f, r in score["families"].items()},
            "overall": score["accuracy"],
            "prefill": measure_prefill(ckpt, data_dir),
        }
    return out


def merged(previous: Path, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` plus the rows of the ``previous`` ablation.json for the variants ``new`` lacks, in table order."""
    rows = json.loads(previous.read_text())["variants"] if previous.is_file() else {}
    rows.update(new)
    return {name: rows[name] for name in VARIANTS if name in rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m playground.ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="checkpoints/ablation", help="data, tower, runs and checkpoints")
    parser.add_argument("--out", default="assets/ablation", help="where ablation.{json,md,png} go")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--report-only", action="store_true", help="do not train: report what --work holds")
    parser.add_argument("--merge", action="store_true",
                        help="keep OUT/ablation.json's rows for the variants not in --variants")
    parser.add_argument("--master-port", type=int, default=29517)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; use {list(VARIANTS)}")
    work, out = Path(args.work).resolve(), Path(args.out)
    torch.manual_seed(0)
    if not args.report_only:
        for k, name in enumerate(variants):
            started = time.perf_counter()
            train_variant(name, work, args.master_port + k)
            print(f"[ablation] {name}: trained and scored in {time.perf_counter() - started:.0f} s", flush=True)
    results = {
        "chance": {f: 100.0 / len(FAMILY_ANSWERS[f]) for f in FAMILY_LABELS},
        "flash_informed_guess": flash_informed_guess(work / "shared" / "data"),
        "variants": merged(out / "ablation.json", collect(work, variants)) if args.merge else collect(work, variants),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "command": " ".join(["python -m playground.ablation", *(argv if argv is not None else sys.argv[1:])]),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    table = render_markdown(results)
    (out / "ablation.md").write_text(table)
    draw_plot(results, out / "ablation.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
