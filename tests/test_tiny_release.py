"""The committed tiny checkpoint (assets/tiny-slowfast), its export, the demo video and the ablation report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llava.model.builder import load_pretrained_model
from llava.model.export import export_checkpoint
from llava.model.tiny import TinySpec, write_tiny_checkpoint
from playground.ablation import (
    VARIANTS,
    draw_plot,
    flash_informed_guess,
    measure_prefill,
    merged,
    render_markdown,
)
from playground.demo_video import DEMO_QUESTIONS
from playground.evaluate_synthetic import FAMILY_ANSWERS, evaluate_checkpoint
from playground.synthetic_data import VIDEO_FAMILIES, generate_dataset, plan_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "assets" / "tiny-slowfast"
DEMO_VIDEO = REPO / "assets" / "demo.mp4"
# The questions the README asks about the demo video.
README_QUESTIONS = (
    "What color is the square?",
    "What color is the circle?",
    "How many shapes are there?",
    "Which direction does the red square move?",
    "Which direction does the blue circle move?",
    "What color was the flash?",
)
# The families the committed checkpoint has learned: all five (see the README).
LEARNED_FAMILIES = ("video_color", "video_direction", "video_count", "video_first", "video_flash")


def _dtypes(path: Path) -> set[torch.dtype]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def _logits(model_path: str | Path) -> torch.Tensor:
    tokenizer, model, processor, _ = load_pretrained_model(str(model_path), device="cpu")
    torch.manual_seed(0)
    frames = torch.rand(model.config.video_frames, 3, 64, 64)
    ids = torch.tensor([[5, 6, -200, 7, 8, 9]])
    with torch.no_grad():
        return model(input_ids=ids, images=[frames]).logits


# ----------------------------------------------------------------- export


def test_export_writes_fp16_weights_that_load_as_fp32_and_agree(tiny_checkpoint, tmp_path):
    out = export_checkpoint(tiny_checkpoint, tmp_path / "fp16", "float16")

    assert _dtypes(out) == {torch.float16}
    config = json.loads((out / "config.json").read_text())
    assert config["vision_tower_pretrained"] is None
    assert {"tokenizer.json", "preprocessor_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    reference, exported = _logits(tiny_checkpoint), _logits(out)
    assert exported.dtype == torch.float32
    torch.testing.assert_close(exported, reference, atol=2e-2, rtol=2e-2)


def test_export_refuses_a_destination_with_files(tiny_checkpoint, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("data")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_checkpoint(tiny_checkpoint, tmp_path / "old")
    assert (tmp_path / "old" / "keep.txt").read_text() == "data"


# ----------------------------------------------------------------- the committed checkpoint


def test_committed_checkpoint_is_small_fp16_and_self_contained():
    size = sum(p.stat().st_size for p in TINY.iterdir())
    assert size < 8 * 2**20
    assert _dtypes(TINY) == {torch.float16}
    config = json.loads((TINY / "config.json").read_text())
    assert config["vision_tower_pretrained"] is None
    assert config["cross_attn_max_layer_depth"] is None and config["cross_attn_every_n_layers"] == 1
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"):
        assert (TINY / name).is_file(), name


@pytest.fixture(scope="module")
def tiny_session():
    from llava.serve.cli import ChatSession

    tokenizer, model, processor, _ = load_pretrained_model(str(TINY), device="cpu")
    return ChatSession(tokenizer, model, processor)


@pytest.mark.parametrize("question", README_QUESTIONS)
def test_committed_checkpoint_answers_the_demo_video(tiny_session, question):
    tiny_session.load_video(DEMO_VIDEO)
    answer = tiny_session.ask(question)
    assert answer.text.strip() == DEMO_QUESTIONS[question]


@pytest.fixture(scope="module")
def shipped_scores(tmp_path_factory) -> dict:
    """The committed checkpoint scored on the recipe's whole test split (500 videos), rendered exactly as
    scripts/tiny/train_tiny.sh renders it (split "test", seed 2, sampled questions, flash rate 0.3)."""
    data = tmp_path_factory.mktemp("test-split")
    generate_dataset(data, num_videos=500, num_images=0, num_text=0, size=64, frames=16, fps=8, seed=2,
                     split="test", questions="sampled", flash_rate=0.3)  # fmt: skip
    torch.manual_seed(0)
    return evaluate_checkpoint(str(TINY), str(data), "test")


def test_shipped_checkpoint_reads_every_family_of_the_whole_test_split(shipped_scores):
    assert shipped_scores["questions"] >= 900 and shipped_scores["frames"] == 16
    assert set(shipped_scores["families"]) == set(VIDEO_FAMILIES) == set(LEARNED_FAMILIES)
    for family in LEARNED_FAMILIES:
        r = shipped_scores["families"][family]
        assert r["questions"] >= 100 and r["accuracy"] >= 80.0, (family, r)


def test_committed_eval_json_is_the_shipped_checkpoints_score(shipped_scores):
    committed = json.loads((TINY / "eval_test.json").read_text())
    assert committed["model"] == "assets/tiny-slowfast" and committed["split"] == "test"
    assert committed["frames"] == shipped_scores["frames"]
    assert committed["questions"] == shipped_scores["questions"]
    for family, r in shipped_scores["families"].items():
        assert (committed["families"][family]["right"], committed["families"][family]["questions"]) == (
            r["right"], r["questions"]
        ), family


# README's names for the families, in its table's order
README_FAMILIES = {"colour": "video_color", "direction": "video_direction", "count": "video_count",
                   "first": "video_first", "flash (detail)": "video_flash"}  # fmt: skip


def readme_test_table() -> dict[str, list[str]]:
    """The cells of README's tiny-model test table, by its first column."""
    text = (REPO / "README.md").read_text()
    start = text.index("**Test accuracy** (`assets/tiny-slowfast/eval_test.json`")
    rows = {}
    for line in text[start:].splitlines()[3:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] not in ("family", "---"):
            rows[cells[0]] = cells
    return rows


def test_readme_test_table_is_the_shipped_checkpoints_score(shipped_scores):
    rows = readme_test_table()
    assert list(rows) == [*README_FAMILIES, "all"]
    for name, family in README_FAMILIES.items():
        r = shipped_scores["families"][family]
        accuracy = f"{100 * r['right'] / r['questions']:.1f} %"
        assert rows[name][1:] == [f"**{accuracy}** ({r['right']}/{r['questions']})", f"{r['chance']:.1f} %",
                                  str(r["questions"])], name  # fmt: skip
    total = shipped_scores
    assert rows["all"][1] == f"{total['accuracy']:.1f} %" and rows["all"][3] == str(total["questions"])


# ----------------------------------------------------------------- the recipe and the ablation


def test_recipe_script_runs_every_stage_with_smoke_sizes(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(
        os.environ, WORK=str(tmp_path / "work"), PYTHON=sys.executable, NPROC_PER_NODE="1", MASTER_PORT="29531",
        MAX_STEPS="2", REFINE_STEPS="3", TOWER_STEPS="2", TRAIN_VIDEOS="6", VAL_VIDEOS="2", TEST_VIDEOS="3",
        THREADS="1", EXTRA_TRAIN_ARGS="--logging_steps 1",
    )  # fmt: skip
    out = tmp_path / "tiny"
    done = subprocess.run(["bash", str(REPO / "scripts/tiny/train_tiny.sh"), str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert _dtypes(out) == {torch.float16}
    config = json.loads((out / "config.json").read_text())
    # The default recipe: every cell of the tower's 8 x 8 grid a slow token, fast tokens averaged to 2 x 2.
    assert config["mm_video_pooling_stride"] == 1 and config["fast_token_spatial_stride"] == 4
    assert config["fast_token_temporal_stride"] == 1
    assert config["slow_token_position_encoding"] == "fourier_spacetime"
    assert config["cross_attn_query_source"] == "own"
    # The training split asks every question of each video, in one conversation; val and test are unchanged.
    train = json.loads((tmp_path / "work" / "data-all-questions" / "train.json").read_text())
    assert len(train) == 6 and all(len(r["conversations"]) >= 6 for r in train)
    assert not (tmp_path / "work" / "data" / "train.json").exists()
    assert (tmp_path / "work" / "data" / "test.json").is_file()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "model.slow_token_position_encoding.weight" in f.keys()
    assert json.loads((out / "eval_test.json").read_text())["split"] == "test"
    # EXTRA_TRAIN_ARGS come after the recipe's options and win: a loss logged at each of the 2 steps.
    stage1 = tmp_path / "work" / "sft-slowfast-fourier_spacetime-pool1-steps2"
    state = json.loads((stage1 / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]
    # The refining stage: 3 more steps from stage 1's weights on the shape-and-flash split with a flash in 75 % of
    # the other videos, and the export is its result, not stage 1's.
    refined = tmp_path / "work" / "sft-slowfast-fourier_spacetime-pool1-steps2-refine_all_shape_flash-flash_rate0.75-steps3"
    state = json.loads((refined / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]
    refine_split = json.loads((tmp_path / "work" / "data-all-shape-flash-questions-flash0.75" / "train.json").read_text())
    assert refine_split == plan_dataset(6, 0, 0, 64, 16, 0, "train", "all_shape_flash", flash_rate=0.75).records()
    name = "model.slow_token_position_encoding.weight"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        exported = f.get_tensor(name).float()
    with safe_open(str(refined / "model.safetensors"), framework="pt") as f:
        assert torch.equal(exported, f.get_tensor(name).half().float())
    with safe_open(str(stage1 / "model.safetensors"), framework="pt") as f:
        assert not torch.equal(exported, f.get_tensor(name).half().float())
    env["REFINE_STEPS"] = "0"  # the runs below check stage 1's data and folders
    # QUESTIONS=all_shape: a training split of its own, with a second conversation per video, and a run of its own.
    shaped = subprocess.run(["bash", str(REPO / "scripts/tiny/train_tiny.sh"), str(tmp_path / "tiny-shape")],
                            env={**env, "QUESTIONS": "all_shape"}, cwd=REPO, capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert shaped.returncode == 0, shaped.stderr[-3000:]
    train = json.loads((tmp_path / "work" / "data-all-shape-questions" / "train.json").read_text())
    assert len(train) == 12 and sum("Which shape is " in r["conversations"][0]["value"] for r in train) == 6
    assert (tmp_path / "work" / "sft-slowfast-fourier_spacetime-pool1-questions_all_shape-steps2" / "model.safetensors").is_file()
    # QUESTIONS=all_shape_flash: the same, with the flash asked again in the shape conversation of flash videos.
    flashed = subprocess.run(["bash", str(REPO / "scripts/tiny/train_tiny.sh"), str(tmp_path / "tiny-flash")],
                             env={**env, "QUESTIONS": "all_shape_flash"}, cwd=REPO, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert flashed.returncode == 0, flashed.stderr[-3000:]
    train_flash = json.loads((tmp_path / "work" / "data-all-shape-flash-questions" / "train.json").read_text())
    assert [r["id"] for r in train_flash] == [r["id"] for r in train]
    assert sum(len(r["conversations"]) for r in train_flash) >= sum(len(r["conversations"]) for r in train)
    assert (tmp_path / "work" / "sft-slowfast-fourier_spacetime-pool1-questions_all_shape_flash-steps2" / "model.safetensors").is_file()
    # FLASH_RATE: other training videos (every one with a flash at 1), in folders of their own; val and test unchanged.
    test_before = (tmp_path / "work" / "data" / "test.json").read_text()
    rated = subprocess.run(["bash", str(REPO / "scripts/tiny/train_tiny.sh"), str(tmp_path / "tiny-rate")],
                           env={**env, "QUESTIONS": "all_shape_flash", "FLASH_RATE": "1"}, cwd=REPO,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert rated.returncode == 0, rated.stderr[-3000:]
    train_rated = json.loads((tmp_path / "work" / "data-all-shape-flash-questions-flash1" / "train.json").read_text())
    assert train_rated == plan_dataset(6, 0, 0, 64, 16, 0, "train", "all_shape_flash", flash_rate=1.0).records()
    assert sum("What color was the flash?" in t["value"] for r in train_rated for t in r["conversations"]) == 12
    assert (tmp_path / "work" / "data" / "test.json").read_text() == test_before
    run = "sft-slowfast-fourier_spacetime-pool1-questions_all_shape_flash-flash_rate1-steps2"
    assert (tmp_path / "work" / run / "model.safetensors").is_file()
    bad = subprocess.run(["bash", str(REPO / "scripts/tiny/train_tiny.sh"), str(out)], env={**env, "VARIANT": "huge"},
                         cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "VARIANT=huge" in bad.stderr
    pooling = subprocess.run(["bash", str(REPO / "scripts/tiny/train_tiny.sh"), str(out)],
                             env={**env, "SLOW_POOLING": "3"}, cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert pooling.returncode == 2 and "SLOW_POOLING=3" in pooling.stderr
    for name, value in (("QUESTIONS", "most"), ("CROSS_ATTN_QUERY", "rope"), ("FLASH_RATE", "2"), ("FLASH_RATE", ".5"),
                        ("REFINE_QUESTIONS", "most"), ("REFINE_FLASH_RATE", "1.5"), ("REFINE_STEPS", "-1"),
                        ("REFINE_STEPS", "2k"), ("MAX_STEPS", "0")):
        refused = subprocess.run(["bash", str(REPO / "scripts/tiny/train_tiny.sh"), str(out)],
                                 env={**env, name: value}, cwd=REPO, capture_output=True, text=True)  # fmt: skip
        assert refused.returncode == 2 and f"{name}={value}" in refused.stderr
    uneven = subprocess.run(["bash", str(REPO / "scripts/tiny/train_tiny.sh"), str(out)],
                            env={**env, "NPROC_PER_NODE": "3"}, cwd=REPO, capture_output=True, text=True, check=False)  # fmt: skip
    assert uneven.returncode == 2 and "NPROC_PER_NODE=3 must divide the global batch of 16" in uneven.stderr



def _variant_checkpoints(root: Path) -> dict[str, Path]:
    """Tiny random checkpoints shaped like the ablation's variants (16 frames, 16 slow tokens a frame)."""
    spec = TinySpec(frames=16, vision_output_stride=8, temporal_stride=4, min_fast_frames=4, cross_attn_every_n_layers=1)
    base = Path(write_tiny_checkpoint(str(root / "slowfast"), spec))
    out = {"slowfast": base}
    for name, changes in {
        "fast": {"cross_attn_max_layer_depth": 0},
        "slow": {"cross_attn_max_layer_depth": 0, "fast_token_temporal_stride": 1, "fast_token_spatial_stride": 1},
        "positions": {"slow_token_position_encoding": "fourier_spacetime"},
        "recipe": {"slow_token_position_encoding": "fourier_spacetime", "cross_attn_query_source": "own"},
        "refined": {"slow_token_position_encoding": "fourier_spacetime", "cross_attn_query_source": "own"},
    }.items():
        path = Path(write_tiny_checkpoint(str(root / name), spec))
        config = json.loads((path / "config.json").read_text())
        config.update(changes)
        (path / "config.json").write_text(json.dumps(config))
        out[name] = path
    return out


def test_measure_prefill_counts_each_variants_tokens(tmp_path):
    data = tmp_path / "data"
    generate_dataset(data, num_videos=2, num_images=0, num_text=0, size=64, frames=16, fps=8, seed=2, split="test")
    checkpoints = _variant_checkpoints(tmp_path)

    p = {name: measure_prefill(path, data, videos=1, repeats=1) for name, path in checkpoints.items()}

    # 16 frames: 4 x 16 fast tokens; 256 slow tokens, cross-attended or read as ordinary tokens.
    assert p["slowfast"]["cross_attended_slow_tokens"] == p["positions"]["cross_attended_slow_tokens"] == 256
    assert p["recipe"]["cross_attended_slow_tokens"] == 256
    assert p["slowfast"]["lm_prefill_tokens"] == p["positions"]["lm_prefill_tokens"] == p["recipe"]["lm_prefill_tokens"]
    assert p["fast"]["cross_attended_slow_tokens"] == p["slow"]["cross_attended_slow_tokens"] == 0
    assert p["slowfast"]["lm_prefill_tokens"] == p["fast"]["lm_prefill_tokens"]
    assert p["slow"]["lm_prefill_tokens"] - p["fast"]["lm_prefill_tokens"] == 256 - 64
    assert all(r["lm_prefill_ms"] > 0 for r in p.values())


def test_ablation_report_has_a_row_per_variant_and_a_plot(tmp_path):
    chance = {f: 100.0 / len(a) for f, a in FAMILY_ANSWERS.items()}
    results = {"chance": chance, "flash_informed_guess": 34.07, "variants": {}}
    for k, name in enumerate(VARIANTS):
        results["variants"][name] = {
            "accuracy": {f: 50.0 + k for f in FAMILY_ANSWERS},
            "prefill": {"lm_prefill_tokens": 100 * (k + 1), "cross_attended_slow_tokens": 0, "lm_prefill_ms": 1.5 * (k + 1)},
        }

    table = render_markdown(results)
    draw_plot(results, tmp_path / "ablation.png")

    rows = table.strip().splitlines()
    assert len(rows) == 2 + len(VARIANTS) + 2
    assert rows[-1] == "Naming a colour that no shape has gives 34.1 % on the flash."
    assert "(a) slow-fast" in rows[2] and "52.0 %" in rows[4] and "4.50" in rows[4]
    assert "flash (detail) (chance 20 %)" in rows[0]
    assert (tmp_path / "ablation.png").stat().st_size > 10_000


def test_ablation_trains_d_with_positions_a_without_and_f_as_the_scripts_defaults(monkeypatch, tmp_path):
    import playground.ablation as ablation

    calls = []
    monkeypatch.setattr(ablation.subprocess, "run", lambda cmd, **kw: calls.append(kw["env"]))
    for name in ("slowfast", "positions", "fast", "recipe", "refined"):
        ablation.train_variant(name, tmp_path, 29600)
    keys = ("VARIANT", "SLOW_POSITIONS", "QUESTIONS", "CROSS_ATTN_QUERY", "REFINE_STEPS")
    settings = [tuple(e[k] for k in keys) for e in calls]
    assert settings == [
        ("slowfast", "none", "sampled", "self_attn", "0"), ("slowfast", "fourier_spacetime", "sampled", "self_attn", "0"),
        ("fast", "none", "sampled", "self_attn", "0"), ("slowfast", "fourier_spacetime", "all", "own", "0"),
        ("slowfast", "fourier_spacetime", "all", "own", "2000"),
    ]  # fmt: skip
    # (f) is (e) with the refining stage, and what the script does when nothing is set
    refine = {"REFINE_STEPS": "2000", "REFINE_QUESTIONS": "all_shape_flash", "REFINE_FLASH_RATE": "0.75"}
    assert ablation.RECIPES["refined"] == {**ablation.RECIPES["recipe"], **refine}
    script = (REPO / "scripts/tiny/train_tiny.sh").read_text()
    for name, value in ablation.RECIPES["refined"].items():
        assert f'{name}="${{{name}:-{value}}}"' in script, name


def test_merge_keeps_the_previous_rows_of_variants_not_rerun_in_table_order(tmp_path):
    previous = tmp_path / "ablation.json"
    previous.write_text(json.dumps({"variants": {"slowfast": {"row": "old a"}, "fast": {"row": "old b"}}}))

    rows = merged(previous, {"positions": {"row": "new d"}, "slowfast": {"row": "new a"}})

    assert list(rows) == ["slowfast", "fast", "positions"]
    assert rows["slowfast"]["row"] == "new a" and rows["fast"]["row"] == "old b"
    assert merged(tmp_path / "missing.json", {"fast": {"row": "b"}}) == {"fast": {"row": "b"}}


def test_flash_informed_guess_rules_out_the_shapes_colours(tmp_path):
    generate_dataset(tmp_path, num_videos=40, num_images=0, num_text=0, size=64, frames=16, fps=8, seed=2, split="test")
    guess = flash_informed_guess(tmp_path)
    # one to three shapes leave four to two colours for the flash
    assert 25.0 <= guess <= 50.0

    records = json.loads((tmp_path / "test.json").read_text())
    records[3]["conversations"][1]["value"] = "purple"
    (tmp_path / "test.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="test_video_0003.*not the planned split"):
        flash_informed_guess(tmp_path)


def test_the_tiny_model_page_shows_the_committed_ablation_output():
    results = json.loads((REPO / "assets/ablation/ablation.json").read_text())
    table = (REPO / "assets/ablation/ablation.md").read_text()
    page = (REPO / "docs" / "tiny-model.md").read_text()

    assert set(results["variants"]) == set(VARIANTS)
    assert table == render_markdown(results)
    for line in table.strip().splitlines():
        assert line in page, line
    assert "assets/ablation/ablation.png" in page and (REPO / "assets/ablation/ablation.png").is_file()
    # (f) is the committed checkpoint: its row is that checkpoint's test score
    committed = json.loads((TINY / "eval_test.json").read_text())
    refined = results["variants"]["refined"]["accuracy"]  # the shipped weights, scored when they were trained
    assert set(refined) == set(committed["families"])
    for family, r in committed["families"].items():
        # today's libraries may flip one answer of the same weights (colour: 237/276 then, 238/276 now), no more
        assert abs(refined[family] - r["accuracy"]) * r["questions"] / 100 <= 1 + 1e-9, family


# ----------------------------------------------------------------- the visual-path probe


def test_scramble_fast_shuffles_or_averages_fast_tokens_and_keeps_slow():
    from llava.model.slow_fast import SlowFastTokens
    from playground.probe_visual_paths import scramble_fast

    tokens = SlowFastTokens(fast=torch.arange(16.0).view(8, 2), slow=torch.randn(5, 2))
    generator = torch.Generator().manual_seed(0)

    shuffled = scramble_fast(tokens, "fast shuffled", generator)
    assert not torch.equal(shuffled.fast, tokens.fast)
    assert sorted(shuffled.fast[:, 0].tolist()) == tokens.fast[:, 0].tolist()
    averaged = scramble_fast(tokens, "fast averaged", generator)
    assert torch.equal(averaged.fast, tokens.fast.mean(0).expand(8, 2))
    assert shuffled.slow is tokens.slow and averaged.slow is tokens.slow
    assert scramble_fast(tokens, "intact", generator) is tokens
    with pytest.raises(ValueError, match="mode 'reversed'"):
        scramble_fast(tokens, "reversed", generator)


def test_probe_scores_every_question_in_each_mode(tmp_path):
    from playground.probe_visual_paths import MODES, format_table, probe

    data = tmp_path / "data"
    generate_dataset(data, num_videos=3, num_images=0, num_text=0, size=64, frames=16, fps=8, seed=1, split="val")
    spec = TinySpec(frames=16, vision_output_stride=8, temporal_stride=4, min_fast_frames=4, cross_attn_every_n_layers=1)
    ckpt = write_tiny_checkpoint(str(tmp_path / "ckpt"), spec)

    result = probe(ckpt, str(data), "val", videos=3, batch=2)

    turns = sum(len(r["conversations"]) // 2 for r in json.loads((data / "val.json").read_text()))
    assert result["videos"] == 3 and sum(result["questions"].values()) == turns
    assert set(result["accuracy"]) == set(MODES)
    assert all(0.0 <= a <= 100.0 for mode in MODES for a in result["accuracy"][mode].values())
    assert all(loss > 0 and math.isfinite(loss) for mode in MODES for loss in result["loss"][mode].values())
    assert result["uniform_loss"]["video_direction"] == pytest.approx(math.log(5))
    assert format_table(result).count("\n") == 2 + len(MODES)
    assert format_table(result, "loss").count("\n") == 3 + len(MODES)


def test_probe_scores_only_the_modes_asked_and_refuses_unknown_ones(tmp_path):
    from playground.probe_visual_paths import probe

    data = tmp_path / "data"
    generate_dataset(data, num_videos=2, num_images=0, num_text=0, size=64, frames=16, fps=8, seed=1, split="val")
    spec = TinySpec(frames=16, vision_output_stride=8, temporal_stride=4, min_fast_frames=4, cross_attn_every_n_layers=1)
    ckpt = write_tiny_checkpoint(str(tmp_path / "ckpt"), spec)

    result = probe(ckpt, str(data), "val", videos=2, modes=("intact",))
    assert result["modes"] == ["intact"] and set(result["loss"]) == {"intact"}
    with pytest.raises(ValueError, match="reversed"):
        probe(ckpt, str(data), "val", videos=2, modes=("reversed",))
