"""Runs that last. Through the project's launch scripts (torchrun, 2 processes, DeepSpeed on CPU): a run stopped
by SIGUSR1 or SIGTERM saves one complete checkpoint and exits 75, and resumed it reproduces the uninterrupted
run's per-step losses under ZeRO-2 and ZeRO-3; a save killed half-way is never resumed from; --max_train_hours
stops the run from inside. Then the pieces on their own: completion markers, the stop decision, the Slurm
wrapper."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava.train.checkpoints import (
    COMPLETE_MARKER,
    checkpoint_problem,
    find_resume_checkpoint,
    rotate_checkpoints,
    write_completion_marker,
)
from llava.train.stopping import StopRequest

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = json.dumps({"depths": [1, 1, 1, 1], "dims": [16, 24, 32, 48], "image_size": 64})
STEPS = 8  # 12 samples, 2 processes x 1 sample x 2 accumulation steps: 3 steps an epoch, resumed mid-epoch 1
SMALL_RUN = ["--video_frames", "4", "--min_fast_frames", "1", "--max_steps", str(STEPS),
             "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
             "--dataloader_num_workers", "0", "--model_max_length", "512", "--save_steps", "2",
             "--save_total_limit", "2", "--seed", "3"]
STOPPED = 75


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A Qwen2 base with a tower file (stage 1 starts there), a Slow-Fast checkpoint (stage 2 starts there), and
    12 visual samples (under ZeRO-3 a text-only micro-batch on one process beside a visual one on the other
    does not run; see the report of issue 18)."""
    from llava.model.tiny import TinySpec, write_tiny_checkpoint, write_tower_file
    from playground.synthetic_data import generate_dataset

    root = tmp_path_factory.mktemp("resume")
    write_tiny_checkpoint(str(root / "base"), TinySpec(), base=True)
    write_tower_file(str(root / "base" / "tower.safetensors"), TinySpec())
    write_tiny_checkpoint(str(root / "stage1"), TinySpec())
    generate_dataset(str(root / "data"), num_videos=5, num_images=2, num_text=0, size=64, frames=8, seed=0)
    samples = json.loads((root / "data" / "train.json").read_text())
    assert len(samples) >= 12
    (root / "data" / "visual.json").write_text(json.dumps(samples[:12]))
    return root


def launch(script: str, root: Path, out: Path, *args: str, stage: str, env: dict | None = None,
           wait: bool = True):
    """Run a recipe script on the tiny model; stage 1 starts from the Qwen2 base, stage 2 from the Slow-Fast
    checkpoint."""
    model = root / ("base" if stage == "pretrain" else "stage1")
    extra = ["--vision_tower_pretrained", str(root / "base" / "tower.safetensors"), "--mm_vision_tower_overrides",
             OVERRIDES, "--cross_attn_every_n_layers", "2"] if stage == "pretrain" else []
    environment = dict(os.environ)
    environment.update(
        PYTHON=sys.executable, MODEL=str(model), DATA_PATH=str(root / "data" / "visual.json"),
        VIDEO_DIR=str(root / "data"), OUTPUT_DIR=str(out), NPROC_PER_NODE="2", MASTER_PORT=str(free_port()),
        CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", **(env or {}),
    )
    command = ["bash", str(REPO / "scripts" / script), *extra, *SMALL_RUN, *args]
    with open(out.parent / f"{out.name}.log", "a") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO),
                                   start_new_session=True)
    if wait:
        process.wait(timeout=900)
    return process


def log_of(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()


def wait_for(path: Path, process: subprocess.Popen, out: Path) -> None:
    """Until ``path`` exists (the run must still be going)."""
    deadline = time.monotonic() + 600
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path} appeared:\n{log_of(out)[-4000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def step_logs(trainer_state: Path) -> list[dict]:
    history = json.loads(trainer_state.read_text())["log_history"]
    return [entry for entry in history if "loss" in entry]


def assert_same_steps(resumed: list[dict], reference: list[dict]) -> None:
    assert [e["step"] for e in resumed] == [e["step"] for e in reference] == list(range(1, STEPS + 1))
    for mine, theirs in zip(resumed, reference):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6), mine["step"]
        assert mine["learning_rate"] == pytest.approx(theirs["learning_rate"], rel=1e-6, abs=1e-12), mine["step"]


def assert_stopped_with_a_checkpoint(out: Path, process: subprocess.Popen, reason: str) -> int:
    assert process.returncode == STOPPED, log_of(out)[-4000:]
    status = json.loads((out / "run_status.json").read_text())
    assert status["status"] == "stopped" and status["reason"] == reason
    step = status["global_step"]
    assert checkpoint_problem(out / f"checkpoint-{step}") is None
    assert not (out / "model.safetensors").exists()  # no final model: the run is not over
    return step


@pytest.fixture(scope="module")
def zero2_reference(workdir) -> list[dict]:
    out = workdir / "zero2-reference"
    process = launch("pretrain/pretrain_frame64-s1t4.sh", workdir, out, stage="pretrain")
    assert process.returncode == 0, log_of(out)[-4000:]
    return step_logs(out / "trainer_state.json")


def test_zero2_run_stopped_by_sigusr1_resumes_with_the_uninterrupted_losses(workdir, zero2_reference):
    out = workdir / "zero2-usr1"
    process = launch("pretrain/pretrain_frame64-s1t4.sh", workdir, out, stage="pretrain", wait=False)
    wait_for(out / "checkpoint-4" / COMPLETE_MARKER, process, out)
    process.send_signal(signal.SIGUSR1)  # to the launcher only: it forwards the signal to the trainers
    process.wait(timeout=600)
    stopped_at = assert_stopped_with_a_checkpoint(out, process, "SIGUSR1")
    assert 4 < stopped_at < STEPS

    resumed = launch("pretrain/pretrain_frame64-s1t4.sh", workdir, out, stage="pretrain")
    assert resumed.returncode == 0, log_of(out)[-4000:]
    assert f"resuming from {out}/checkpoint-{stopped_at}" in log_of(out)
    assert_same_steps(step_logs(out / "trainer_state.json"), zero2_reference)


def test_zero3_run_stopped_by_sigterm_resumes_with_the_uninterrupted_losses(workdir):
    reference_out = workdir / "zero3-reference"
    reference = launch("finetune/finetune_frame64-s1t4.sh", workdir, reference_out, stage="finetune")
    assert reference.returncode == 0, log_of(reference_out)[-4000:]

    out = workdir / "zero3-term"
    process = launch("finetune/finetune_frame64-s1t4.sh", workdir, out, stage="finetune", wait=False)
    wait_for(out / "checkpoint-4" / COMPLETE_MARKER, process, out)
    os.killpg(process.pid, signal.SIGTERM)  # the launcher's whole process group, torchrun included
    process.wait(timeout=600)
    stopped_at = assert_stopped_with_a_checkpoint(out, process, "SIGTERM")
    assert 4 < stopped_at < STEPS

    resumed = launch("finetune/finetune_frame64-s1t4.sh", workdir, out, stage="finetune")
    assert resumed.returncode == 0, log_of(out)[-4000:]
    assert_same_steps(step_logs(out / "trainer_state.json"), step_logs(reference_out / "trainer_state.json"))


KILLER = '''
import os, signal
if os.environ.get("RANK") == "1" and os.environ.get("KILL_DURING_SAVE_AT_STEP"):
    from llava.train import trainer as _trainer
    _original = _trainer.SlowFastTrainer._save_rng_state
    def _save_rng_state(self, output_dir):
        if self.state.global_step == int(os.environ["KILL_DURING_SAVE_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)  # weights and ZeRO shards written; this process's RNG state not
        return _original(self, output_dir)
    _trainer.SlowFastTrainer._save_rng_state = _save_rng_state
'''


def test_a_save_killed_half_way_is_skipped_and_the_run_resumes_from_the_previous_checkpoint(
    workdir, zero2_reference, tmp_path
):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILLER)
    out = workdir / "zero2-killed"
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]), "KILL_DURING_SAVE_AT_STEP": "4"}
    # keeping one checkpoint: the older one may only go once the new one is complete
    killed = launch("pretrain/pretrain_frame64-s1t4.sh", workdir, out, "--save_total_limit", "1", stage="pretrain",
                    env=env)
    assert killed.returncode not in (0, STOPPED)
    assert (out / "checkpoint-4" / "rng_state_0.pth").exists() and not (out / "checkpoint-4" / "rng_state_1.pth").exists()
    assert "no checkpoint_complete.json" in checkpoint_problem(out / "checkpoint-4")
    assert checkpoint_problem(out / "checkpoint-2") is None

    resumed = launch("pretrain/pretrain_frame64-s1t4.sh", workdir, out, stage="pretrain")
    assert resumed.returncode == 0, log_of(out)[-4000:]
    log = log_of(out)
    assert f"not resuming from {out}/checkpoint-4: no {COMPLETE_MARKER}: its save did not finish" in log
    assert f"resuming from {out}/checkpoint-2: the newest complete checkpoint" in log
    assert_same_steps(step_logs(out / "trainer_state.json"), zero2_reference)


def test_max_train_hours_stops_the_run_from_inside_with_a_checkpoint(workdir):
    out = workdir / "zero2-budget"
    # 0.36 ms: spent before the first step ends on any machine, so the processes agree to stop after it
    process = launch("pretrain/pretrain_frame64-s1t4.sh", workdir, out, "--max_train_hours", "0.0000001",
                     "--stop_margin_minutes", "0", stage="pretrain")
    assert assert_stopped_with_a_checkpoint(out, process, "time budget (--max_train_hours)") == 1


# ----------------------------------------------------------------------------- completion markers


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    folder = root / f"checkpoint-{step}"
    (folder / "global_step").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    (folder / "global_step" / "optim_states.pt").write_bytes(b"y" * 20)
    if complete:
        write_completion_marker(folder, step)
    return folder


def test_resume_takes_the_newest_complete_checkpoint_and_says_why_it_skipped_newer_ones(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 10)
    truncated = _fake_checkpoint(tmp_path, 4)
    (truncated / "global_step" / "optim_states.pt").write_bytes(b"y" * 3)
    missing = _fake_checkpoint(tmp_path, 6)
    (missing / "model.safetensors").unlink()
    _fake_checkpoint(tmp_path, 8, complete=False)
    (tmp_path / "checkpoint-10" / COMPLETE_MARKER).write_text("{not json")
    chosen, skipped = find_resume_checkpoint(tmp_path)
    assert chosen == str(tmp_path / "checkpoint-2")
    reasons = {Path(path).name: why for path, why in skipped}
    assert list(reasons) == ["checkpoint-10", "checkpoint-8", "checkpoint-6", "checkpoint-4"]
    assert "unreadable" in reasons["checkpoint-10"]
    assert reasons["checkpoint-8"] == f"no {COMPLETE_MARKER}: its save did not finish"
    assert "'model.safetensors'" in reasons["checkpoint-6"] and "missing" in reasons["checkpoint-6"]
    assert "has 3 bytes where" in reasons["checkpoint-4"]


def test_rotation_keeps_the_newest_complete_checkpoints_and_drops_incomplete_ones(tmp_path):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 9, complete=False)
    deleted = rotate_checkpoints(tmp_path, keep=2)
    assert sorted(Path(p).name for p in deleted) == ["checkpoint-1", "checkpoint-9"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    assert rotate_checkpoints(tmp_path, keep=None) == []


# ----------------------------------------------------------------------------- the stop decision


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_time_budget_stops_once_one_more_step_and_a_save_no_longer_fit():
    clock = FakeClock()
    request = StopRequest(max_train_hours=1.0, margin_minutes=5, clock=clock)
    request.record_step(60.0)
    clock.now += 3600 - 60 - 300 - 1  # 6 min 1 s left: a 1-minute step and the 5-minute margin fit
    assert request.local_code() == 0
    request.record_save(120.0)  # a measured save shorter than the margin changes nothing
    assert request.local_code() == 0
    clock.now += 2
    assert request.local_code() == 1
    clock.now -= 2
    request.record_save(400.0)  # a measured save longer than the margin replaces it
    assert request.local_code() == 1
    assert StopRequest(None, clock=clock).local_code() == 0


def test_sigusr1_and_sigterm_set_the_stop_request_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    for sig, code in ((signal.SIGUSR1, 2), (signal.SIGTERM, 3)):
        request = StopRequest()
        with request.handling_signals():
            assert request.local_code() == 0
            os.kill(os.getpid(), sig)
            time.sleep(0.01)  # let the interpreter run the handler
            assert request.local_code() == code and request.signal_name == sig.name
        assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before


# ----------------------------------------------------------------------------- Slurm


FAKE_SRUN = '''#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE/srun.args"
while [[ ! -f "$FAKE/srun.status" ]]; do sleep 0.05; done
[[ -f "$FAKE/run_status.json" ]] && cp "$FAKE/run_status.json" "$OUTPUT_DIR/run_status.json"
exit "$(cat "$FAKE/srun.status")"
'''
FAKE_SCANCEL = '''#!/usr/bin/env bash
echo "$@" >> "$FAKE/scancel.calls"
echo 75 > "$FAKE/srun.status"
'''
FAKE_SCONTROL = '''#!/usr/bin/env bash
if [[ "$1" == show ]]; then echo node0; else echo "$@" >> "$FAKE/scontrol.calls"; fi
'''


def slurm_job(tmp_path: Path, script: str) -> tuple[subprocess.Popen, Path]:
    """The Slurm wrapper with stand-ins for srun (waits for ``srun.status``), scancel and scontrol."""
    fake = tmp_path / "fake"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    (tmp_path / "out").mkdir(exist_ok=True)
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", FAKE=str(fake), SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node0", SLURM_NNODES="1", SLURM_SUBMIT_DIR=str(REPO), OUTPUT_DIR=str(tmp_path / "out"))
    process = subprocess.Popen(["bash", str(REPO / "scripts" / script), "--learning_rate", "1e-4"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return process, fake


@pytest.mark.parametrize("script", ["pretrain/slurm_pretrain_frame64-s1t4.sh", "finetune/slurm_finetune_frame64-s1t4.sh"])
def test_slurm_job_forwards_sigusr1_to_the_step_and_requeues_itself(tmp_path, script):
    header = (REPO / "scripts" / script).read_text()
    assert "#SBATCH --signal=B:USR1@300" in header and "#SBATCH --requeue" in header
    process, fake = slurm_job(tmp_path, script)
    while not (fake / "srun.args").exists():
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == STOPPED, output
    assert (fake / "scancel.calls").read_text().split() == ["--signal=USR1", "4242"]
    assert (fake / "scontrol.calls").read_text().split() == ["requeue", "4242"]
    srun = (fake / "srun.args").read_text().splitlines()
    recipe = script.replace("slurm_", "")
    assert srun[0] == "--kill-on-bad-exit=1" and srun[-3:] == [str(REPO / "scripts" / recipe), "--learning_rate", "1e-4"]


@pytest.mark.parametrize("status", [0, 1])
def test_slurm_job_that_finished_or_failed_is_not_requeued(tmp_path, status):
    # a previous job's stop record does not count: the job removes it before the step starts
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run_status.json").write_text(json.dumps({"status": "stopped"}))
    process, fake = slurm_job(tmp_path, "pretrain/slurm_pretrain_frame64-s1t4.sh")
    (fake / "srun.status").write_text(str(status))
    output = process.communicate(timeout=60)[0]
    assert process.returncode == status, output
    assert not (fake / "scontrol.calls").exists()


def test_slurm_job_whose_step_was_killed_after_a_stop_with_a_checkpoint_is_requeued(tmp_path):
    # --kill-on-bad-exit: the first node's 75 can get the others killed as they exit
    process, fake = slurm_job(tmp_path, "pretrain/slurm_pretrain_frame64-s1t4.sh")
    (fake / "run_status.json").write_text(json.dumps({"status": "stopped", "reason": "SIGUSR1"}, indent=1))
    (fake / "srun.status").write_text("137")
    output = process.communicate(timeout=60)[0]
    assert process.returncode == STOPPED, output
    assert (fake / "scontrol.calls").read_text().split() == ["requeue", "4242"]
