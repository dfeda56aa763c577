"""Checkpoint bookkeeping that cannot lose the newest work, and resumes that check what they resume: rotation
that never deletes the checkpoint just written, rollbacks that set newer checkpoints aside, incomplete folders
removed whatever --save_total_limit, one save per step, the run record in the completion marker (world size, ZeRO
stage, data fingerprint, arguments) checked before the model is built, and rank 0's choice shared by every rank.
The training runs here are in-process (one process, no DeepSpeed) on the tiny model."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from llava.train.checkpoints import (
    COMPLETE_MARKER,
    SET_ASIDE_DIR,
    checkpoint_problem,
    find_resume_checkpoint,
    read_run_record,
    rotate_checkpoints,
    write_completion_marker,
)
from llava.train.run_record import data_fingerprint, given_options, resume_mismatches

from test_train import base_dir, common_argv, data_dir  # noqa: F401  (module fixtures)

REPO = Path(__file__).resolve().parents[1]


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    if complete:
        write_completion_marker(folder, step)
    return folder


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-"))


# ----------------------------------------------------------------------------- rotation and rollbacks


def test_rotation_never_deletes_the_checkpoint_just_written_and_sets_newer_ones_aside(tmp_path, caplog):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    # the run rolled back to checkpoint-2 and has just written checkpoint-4 again; checkpoint-6 is abandoned work
    caplog.set_level(logging.WARNING, logger="llava.train")
    deleted = rotate_checkpoints(tmp_path, keep=1, just_written=tmp_path / "checkpoint-4")
    assert [Path(p).name for p in deleted] == ["checkpoint-2"]
    assert names(tmp_path) == ["checkpoint-4"]
    aside = list((tmp_path / SET_ASIDE_DIR).iterdir())
    assert [p.name.split(".")[0] for p in aside] == ["checkpoint-6"] and checkpoint_problem(aside[0]) is None
    assert "checkpoint-4" in (aside[0] / "set_aside_reason.txt").read_text()
    assert any("set" in r.getMessage() and "aside" in r.getMessage() for r in caplog.records)
    assert find_resume_checkpoint(tmp_path)[0] == str(tmp_path / "checkpoint-4")


def test_incomplete_folders_go_once_a_newer_complete_checkpoint_exists_whatever_the_limit(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4, complete=False)
    fake_checkpoint(tmp_path, 6)
    assert [Path(p).name for p in rotate_checkpoints(tmp_path, keep=None, just_written=tmp_path / "checkpoint-6")] \
        == ["checkpoint-4"]
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-6"]
    # nothing complete yet: an incomplete folder is left alone
    lone = tmp_path / "lone"
    fake_checkpoint(lone, 2, complete=False)
    assert rotate_checkpoints(lone, keep=1) == [] and names(lone) == ["checkpoint-2"]


def run_in_process(argv: list[str]) -> int:
    from llava.train.train import main

    return main(argv)


def test_a_rollback_sets_newer_checkpoints_aside_and_the_next_resume_continues_the_rolled_back_run(
    base_dir, data_dir, tmp_path, monkeypatch  # noqa: F811
):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    out = tmp_path / "run"
    argv = common_argv(base_dir, data_dir, out)
    assert run_in_process(argv + ["--max_steps", "6"]) == 0
    assert names(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]

    # roll back to step 2 and train to 4 again, keeping one checkpoint
    assert run_in_process(argv + ["--max_steps", "4", "--save_total_limit", "1",
                                  "--resume_from_checkpoint", str(out / "checkpoint-2")]) == 0
    assert names(out) == ["checkpoint-4"] and checkpoint_problem(out / "checkpoint-4") is None
    aside = sorted(p.name.split(".")[0] for p in (out / SET_ASIDE_DIR).iterdir())
    assert aside == ["checkpoint-4", "checkpoint-6"]  # the abandoned ones, neither deleted nor resumable
    assert find_resume_checkpoint(out)[0] == str(out / "checkpoint-4")
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_a_stop_with_epoch_saves_saves_its_step_once(base_dir, data_dir, tmp_path, monkeypatch):  # noqa: F811
    from transformers import Trainer

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    saved = []
    original = Trainer._save_checkpoint

    def counting(self, model, trial):
        saved.append(self.state.global_step)
        return original(self, model, trial)

    monkeypatch.setattr(Trainer, "_save_checkpoint", counting)
    out = tmp_path / "run"
    argv = common_argv(base_dir, data_dir, out) + [
        "--max_steps", "4", "--save_strategy", "epoch", "--save_total_limit", "1",
        "--max_train_hours", "0.0000001", "--stop_margin_minutes", "0",
    ]
    assert run_in_process(argv) == 75
    assert saved == [1]  # the stop's checkpoint; the epoch-end save of the same step does not rewrite it
    assert checkpoint_problem(out / "checkpoint-1") is None


# ----------------------------------------------------------------------------- the run record


def test_the_marker_records_world_size_zero_stage_data_and_the_command_lines_arguments(
    base_dir, data_dir, tmp_path  # noqa: F811
):
    out = tmp_path / "run"
    argv = common_argv(base_dir, data_dir, out) + ["--max_steps", "2", "--seed", "7"]
    assert run_in_process(argv) == 0
    run = read_run_record(out / "checkpoint-2")
    assert (run["world_size"], run["zero_stage"]) == (1, None)
    assert run["data"]["seed"] == 7 and run["data"]["annotation"]["bytes"] == (data_dir / "train.json").stat().st_size
    assert run["arguments"]["learning_rate"] == 1e-3 and "seed" in run["given"] and "weight_decay" not in run["given"]


def _refusal(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_resume_with_another_world_size_is_refused_before_the_model_is_built(
    base_dir, data_dir, tmp_path, monkeypatch, capsys  # noqa: F811
):
    import llava.train.train as train_module

    out = tmp_path / "run"
    argv = common_argv(base_dir, data_dir, out)
    assert run_in_process(argv + ["--max_steps", "2"]) == 0
    marker = out / "checkpoint-2" / COMPLETE_MARKER
    payload = json.loads(marker.read_text())
    payload["run"].update(world_size=2, zero_stage=3)
    marker.write_text(json.dumps(payload))

    def never(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(train_module, "build_model", never)
    for extra in ([], ["--allow_resume_mismatch", "True"]):  # no flag makes a world-size change resumable
        capsys.readouterr()
        assert run_in_process(argv + ["--max_steps", "4", *extra]) == 2
        message = _refusal(capsys)
        assert f"cannot resume from {out}/checkpoint-2" in message
        assert "world size 2 processes -> 1" in message and "ZeRO stage 3 -> null" in message


def test_a_changed_seed_data_and_learning_rate_are_refused_by_name_unless_allowed(
    base_dir, data_dir, tmp_path, capsys, caplog  # noqa: F811
):
    out = tmp_path / "run"
    data = tmp_path / "train.json"
    data.write_text((data_dir / "train.json").read_text())
    argv = common_argv(base_dir, data_dir, out)
    argv[argv.index("--data_path") + 1] = str(data)
    assert run_in_process(argv + ["--max_steps", "2", "--seed", "3"]) == 0
    samples = json.loads(data.read_text())
    data.write_text(json.dumps(samples[1:]))  # one sample fewer
    changed = argv + ["--max_steps", "3", "--seed", "4", "--learning_rate", "2e-3"]

    capsys.readouterr()
    assert run_in_process(changed) == 2
    message = _refusal(capsys)
    for item in ("--seed 3 -> 4", "--learning_rate 0.001 -> 0.002", "the annotation file changed",
                 "--allow_resume_mismatch True"):
        assert item in message
    assert "--max_steps" not in message  # a longer run is allowed (and logged)

    caplog.set_level(logging.WARNING, logger="llava.train")
    assert run_in_process(changed + ["--allow_resume_mismatch", "True"]) == 0
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "--allow_resume_mismatch" in warnings and "--learning_rate 0.001 -> 0.002" in warnings
    assert "resuming with another run length: --max_steps 2 -> 3" in warnings


def test_data_fingerprint_follows_the_mixture_file_each_sources_size_and_the_seeds(tmp_path, monkeypatch):
    import llava.train.data as data_module

    def no_parsing(*args, **kwargs):
        raise AssertionError("annotations parsed to take a fingerprint")

    monkeypatch.setattr(data_module, "load_annotations", no_parsing)
    (tmp_path / "a.json").write_text('[{"conversations": []}]')
    (tmp_path / "b.jsonl").write_text('{"conversations": []}\n')
    mixture = tmp_path / "mix.yaml"
    mixture.write_text("sources:\n  - {annotation: a.json}\n  - {annotation: b.jsonl, ratio: 0.5}\n")
    base = data_fingerprint(str(mixture), 1, None)
    assert set(base["sources"]) == {"a.json", "b.jsonl"}

    def differences(then: dict, now: dict) -> list[str]:
        return resume_mismatches({"data": then}, {"data": now})[1]

    assert differences(base, data_fingerprint(str(mixture), 1, None)) == []
    assert differences(base, data_fingerprint(str(mixture), 2, 5)) == ["--seed 1 -> 2", "--data_seed null -> 5"]
    (tmp_path / "b.jsonl").write_text('{"conversations": []}\n{"conversations": []}\n')
    assert [d.split(" (")[0] for d in differences(base, data_fingerprint(str(mixture), 1, None))] == \
        ["source 'b.jsonl' changed"]
    mixture.write_text("sources:\n  - {annotation: a.json}\n  - {annotation: b.jsonl, ratio: 0.7}\n")
    assert differences(base, data_fingerprint(str(mixture), 1, None))[0] == "the mixture file's content changed"
    mixture.write_text("sources:\n  - {annotation: a.json}\n  - {annotation: c.json}\n")
    listed = differences(base, data_fingerprint(str(mixture), 1, None))
    assert "source 'b.jsonl' is no longer in the mixture" in listed and "source 'c.json' is new in the mixture" in listed


def test_options_that_do_not_change_training_are_not_compared_and_the_run_length_only_logged():
    then = {"world_size": 2, "zero_stage": 2, "data": {}, "given": ["output_dir", "save_steps", "max_steps"],
            "arguments": {"output_dir": "a", "save_steps": 10, "dataloader_num_workers": 0, "max_steps": 10,
                          "weight_decay": 0.0}}
    now = {"world_size": 2, "zero_stage": 2, "data": {}, "given": ["dataloader_num_workers", "max_steps"],
           "arguments": {"output_dir": "b", "save_steps": 20, "dataloader_num_workers": 8, "max_steps": 20,
                         "weight_decay": 0.1}}
    assert resume_mismatches(then, now) == ([], [], ["--max_steps 10 -> 20"])  # weight_decay: given by neither


def test_given_options_are_the_ones_the_command_line_sets():
    from transformers import HfArgumentParser

    from llava.train.arguments import ModelArguments, TrainingArguments
    from llava.train.data import DataArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    argv = ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", "o", "--lr_scheduler_type", "cosine",
            "--no_is_multimodal", "--bf16", "False"]
    assert given_options(parser, argv) == sorted(
        ["model_name_or_path", "data_path", "output_dir", "lr_scheduler_type", "is_multimodal", "bf16"])


# ----------------------------------------------------------------------------- rank 0 decides for every rank

RANKS_SCRIPT = '''
import os, sys, types
import torch
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
from llava.train import checkpoints, resume
if rank == 1:  # this node's file system lags: it does not see checkpoint-4 yet
    real = checkpoints.os.listdir
    checkpoints.os.listdir = lambda path: [n for n in real(path) if n != "checkpoint-4"]
args = types.SimpleNamespace(output_dir=sys.argv[1], resume_from_checkpoint=None, allow_resume_mismatch=False)
run = {"world_size": 2, "zero_stage": 2, "data": {}, "arguments": {}, "given": []}
print("chose", resume.choose_resume(args, run), flush=True)
try:
    resume.choose_resume(args, dict(run, world_size=4))
except resume.RunRefused as err:
    print("refused", str(err).split(":")[0], flush=True)
def only_rank_1_fails():
    if rank == 1:
        raise FileNotFoundError("annotation file 'x.json' does not exist")
    return "loaded"
try:
    resume.agreed(only_rank_1_fails)
except resume.RunRefused as err:
    print("agreed refusal", err, flush=True)
torch.distributed.destroy_process_group()
'''


def test_rank_0_chooses_the_checkpoint_for_ranks_that_see_different_folders_and_they_refuse_together(tmp_path):
    out = tmp_path / "out"
    record = {"world_size": 2, "zero_stage": 2, "data": {}, "arguments": {}, "given": []}
    for step in (2, 4):
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "w.bin").write_text("x")
        write_completion_marker(folder, step, run=record)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    processes = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        processes.append(subprocess.Popen([sys.executable, "-c", RANKS_SCRIPT, str(out)], env=env, cwd=str(REPO),
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output
        lines = [line for line in output.splitlines() if line.startswith(("chose", "refused", "agreed"))]
        assert lines == [f"chose {out}/checkpoint-4", f"refused cannot resume from {out}/checkpoint-4",
                         "agreed refusal annotation file 'x.json' does not exist"], output
