"""Preemption as clusters do it, piece by piece: DataLoader workers that outlive a stop signal and stay silent,
the stop decision after a periodic save and with two saves due, the launch script that keeps a signal arriving
before its trainers listen, and the Slurm wrapper's cap on restarts that make no progress. (The runs through the
recipe scripts are in tests/test_train_resume.py.)"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from llava.train.stopping import StopCallback, StopRequest
from llava.train.worker_signals import shield_workers

from test_train_resume import STOPPED, _parent_of, descendants, slurm_job

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- DataLoader workers


class _Numbers(Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(0.02)
        return torch.tensor([index])


def _record_seen(worker_id: int) -> None:
    Path(os.environ["SEEN_DIR"], f"init-{worker_id}").write_text(str(os.getpid()))


def _load_while_signalled(loader, sig: signal.Signals) -> list[int]:
    """Iterate ``loader``, sending ``sig`` to each of its workers (the children this process started for it) after
    the first batch; the values loaded. Children that existed before (a pool another test left) are not counted."""
    before = _children()
    iterator = iter(loader)
    try:
        values = next(iterator).flatten().tolist()
        workers = sorted(_children() - before)
        assert len(workers) == 2, workers
        for pid in workers:
            os.kill(pid, sig)
        for batch in iterator:
            values += batch.flatten().tolist()
    finally:
        del iterator  # shuts its workers down even when an assertion above failed
    return values


def _children() -> set[int]:
    return {pid for pid in descendants(os.getpid()) if _parent_of(pid) == os.getpid()}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_dataloader_workers_outlive_a_stop_signal_and_leave_it_to_the_trainer(tmp_path, monkeypatch, sig):
    monkeypatch.setenv("SEEN_DIR", str(tmp_path))
    # the trainer's handler, which a forked worker inherits: it leaves a file named for the process that ran it
    previous = signal.signal(sig, lambda signum, frame: (tmp_path / f"handled-{os.getpid()}").touch())
    try:
        loader = shield_workers(DataLoader(_Numbers(), batch_size=2, num_workers=2, worker_init_fn=_record_seen))
        assert _load_while_signalled(loader, sig) == list(range(24))  # PyTorch's worker would die of SIGTERM
    finally:
        signal.signal(sig, previous)
    assert list(tmp_path.glob("handled-*")) == []  # no worker ran the trainer's handler
    assert len(list(tmp_path.glob("init-*"))) == 2  # the loader's own worker_init_fn still ran


def test_the_trainers_training_loader_has_shielded_workers(tmp_path):
    from llava.train.arguments import TrainingArguments
    from llava.train.trainer import SlowFastTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2,
                             dataloader_num_workers=2, report_to=[])
    trainer = SlowFastTrainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=_Numbers(),
                              data_collator=torch.utils.data.default_collate)
    loaded = _load_while_signalled(trainer.get_train_dataloader(), signal.SIGTERM)
    assert sorted(loaded) == list(range(24))


def _signal_self_before_init(original):
    def set_handlers() -> None:
        original()
        os.kill(os.getpid(), signal.SIGTERM)  # as if the cluster's signal came between fork and worker_init_fn

    return set_handlers


def test_a_stop_signal_reaching_a_worker_before_its_init_is_discarded(monkeypatch):
    from torch.utils.data._utils import signal_handling

    monkeypatch.setattr(signal_handling, "_set_worker_signal_handlers",
                        _signal_self_before_init(signal_handling._set_worker_signal_handlers))
    loader = shield_workers(DataLoader(_Numbers(), batch_size=4, num_workers=2))  # workers fork this patch
    assert [v for batch in loader for v in batch.flatten().tolist()] == list(range(24))


@pytest.mark.parametrize("start", [None, "fork", "spawn", "forkserver"])
def test_every_start_method_starts_workers_with_the_stop_signals_blocked(start):
    from llava.train.worker_signals import _StartsBlocked

    loader = shield_workers(DataLoader(_Numbers(), num_workers=1, multiprocessing_context=start))
    expected = multiprocessing.get_context(start).get_start_method()
    assert loader.multiprocessing_context.get_start_method() == expected
    assert issubclass(loader.multiprocessing_context.Process, _StartsBlocked)


def test_shielding_composes_with_the_loaders_worker_init_once_and_leaves_a_loader_without_workers_alone():
    loader = DataLoader(_Numbers(), batch_size=2, num_workers=2, worker_init_fn=_record_seen)
    shield_workers(shield_workers(loader))
    assert loader.worker_init_fn.keywords["then"] is _record_seen  # wrapped once, the loader's own kept
    plain = DataLoader(_Numbers(), batch_size=2)
    assert shield_workers(plain) is plain and plain.worker_init_fn is None and plain.multiprocessing_context is None


# ----------------------------------------------------------------------------- the stop decision


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _step_end(callback: StopCallback, step: int, save_due: bool) -> SimpleNamespace:
    control = SimpleNamespace(should_save=save_due, should_training_stop=False)
    callback.on_step_end(SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(global_step=step), control)
    return control


def test_the_budget_keeps_time_for_two_saves_when_a_periodic_save_is_due():
    # 4 h, 20 s steps, 300 s saves, 330 s left after a step: enough for one more step and the final save, not for
    # the periodic save first (the final save would end about 290 s after the budget)
    for save_due in (False, True):
        clock = FakeClock()
        request = StopRequest(max_train_hours=4.0, margin_minutes=0, clock=clock)
        request.record_save(300.0)
        callback = StopCallback(request)
        clock.now += 4 * 3600 - 350
        callback.on_train_begin(None, None, None)
        clock.now += 20  # one 20 s step
        control = _step_end(callback, 100, save_due=save_due)
        assert control.should_training_stop is save_due and (request.reason is not None) is save_due
        assert control.should_save is save_due  # the save due is the stop's checkpoint
    assert (request.reason, request.stop_step) == ("time budget (--max_train_hours)", 100)


def test_a_signal_during_a_periodic_save_stops_right_after_it_without_another_step_or_save():
    clock = FakeClock()
    request = StopRequest(clock=clock)
    callback = StopCallback(request)
    callback.on_train_begin(None, None, None)
    control = _step_end(callback, 6, save_due=True)
    assert not control.should_training_stop
    request._on_signal(signal.SIGTERM, None)  # arrives while the checkpoint of step 6 is written
    control.should_save = False  # the Trainer's on_save resets it before the callbacks run
    callback.on_save(SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(global_step=6), control)
    assert control.should_training_stop and not control.should_save
    assert (request.reason, request.stop_step) == ("SIGTERM", 6)


def test_a_budget_that_a_periodic_save_used_up_stops_right_after_the_save():
    clock = FakeClock()
    request = StopRequest(max_train_hours=1.0, margin_minutes=1, clock=clock)
    callback = StopCallback(request)
    clock.now += 3600 - 400
    callback.on_train_begin(None, None, None)
    clock.now += 10  # a 10 s step, 390 s left: the periodic save (1 min margin) and the next step and save fit
    control = _step_end(callback, 10, save_due=True)
    assert not control.should_training_stop
    clock.now += 350  # but the save took almost 6 min: 40 s left
    request.record_save(350.0)
    control.should_save = False
    callback.on_save(SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(global_step=10), control)
    assert control.should_training_stop and not control.should_save and request.stop_step == 10


def test_the_signal_handler_only_sets_a_flag_and_the_loop_logs_it_once(caplog):
    request = StopRequest()
    request._on_signal(signal.SIGUSR1, None)
    request._on_signal(signal.SIGTERM, None)
    assert not caplog.records  # nothing logged from inside a handler
    caplog.set_level("WARNING", logger="llava.train")
    assert request.local_code() == request.local_code() == 2  # the first signal decides
    assert [r.getMessage() for r in caplog.records] == [
        "received SIGUSR1: finishing the current step, then saving a checkpoint and stopping"
    ]


# ----------------------------------------------------------------------------- the launch script

FAKE_TORCHRUN = '''#!/usr/bin/env bash
# stands in for `python -m torch.distributed.run --nproc_per_node N ...`: N trainers, started after AGENT_DELAY s
nproc=1
while [[ $# -gt 0 ]]; do [[ "$1" == --nproc_per_node ]] && nproc="$2"; shift; done
sleep "$AGENT_DELAY"
for ((rank = 0; rank < nproc; rank++)); do RANK=$rank "$REAL_PYTHON" "$FAKE/trainer.py" & done
wait
'''
FAKE_TRAINER = '''import json, os, signal, time
fake, out = os.environ["FAKE"], os.environ["OUTPUT_DIR"]
time.sleep(float(os.environ["TRAINER_DELAY"]))  # importing: the stop signals are still ignored (inherited)
got = []
for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, lambda signum, frame: got.append(signal.Signals(signum).name))
deadline = time.monotonic() + 8
while not got and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)  # a duplicate would arrive by now
with open(os.path.join(fake, "rank%s" % os.environ["RANK"]), "w") as handle:
    handle.write(" ".join(got))
if got and os.environ["RANK"] == "0":
    with open(os.path.join(out, "run_status.json"), "w") as handle:
        json.dump({"status": "stopped", "reason": got[0]}, handle, indent=1)
'''


def _fake_trainers(fake: Path) -> list[str]:
    found = subprocess.run(["pgrep", "-f", str(fake / "trainer.py")], capture_output=True, text=True, check=False)
    return found.stdout.split()


def _catches(pid: int, sig: signal.Signals) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.parametrize("agent_delay, trainer_delay", [(1.5, 0.2), (0.0, 2.0)],
                         ids=["before-torchrun-starts-its-trainers", "while-the-trainers-start-up"])
def test_launcher_keeps_a_stop_signal_until_its_trainers_listen_then_delivers_it_once(
    tmp_path, agent_delay, trainer_delay
):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "python").write_text(FAKE_TORCHRUN)
    (fake / "python").chmod(0o755)
    (fake / "trainer.py").write_text(FAKE_TRAINER)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHON=str(fake / "python"), REAL_PYTHON=sys.executable, FAKE=str(fake),
               AGENT_DELAY=str(agent_delay), TRAINER_DELAY=str(trainer_delay), MODEL="m", DATA_PATH="d.json",
               OUTPUT_DIR=str(out), NPROC_PER_NODE="2", CUDA_VISIBLE_DEVICES="")
    launcher = subprocess.Popen(["bash", str(REPO / "scripts" / "pretrain" / "pretrain_frame64-s1t4.sh")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 30
    while not _catches(launcher.pid, signal.SIGTERM):  # the script's handler is installed
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    while agent_delay == 0 and len(_fake_trainers(fake)) < 2:  # they exist, still ignoring the signal
        assert time.monotonic() < deadline
        time.sleep(0.01)
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=60)[0]
    assert [(fake / f"rank{rank}").read_text() for rank in (0, 1)] == ["SIGTERM", "SIGTERM"], output
    assert launcher.returncode == STOPPED, output
    assert output.count("launch_train: TERM received") == 1


# ----------------------------------------------------------------------------- Slurm: restarts without progress

FAKE_SRUN_SAVING = '''#!/usr/bin/env bash
# the step: stops with a new complete checkpoint at step $(cat $FAKE/new_step) (none if the file is empty)
printf '%s\\n' "$@" > "$FAKE/srun.args"
step=$(cat "$FAKE/new_step" 2>/dev/null || true)
if [[ -n "$step" ]]; then
    "$PYTHON" -c 'import os, sys; from llava.train.checkpoints import write_completion_marker as w
d = os.path.join(sys.argv[1], "checkpoint-" + sys.argv[2]); os.makedirs(d); open(os.path.join(d, "w.bin"), "w").write("x")
w(d, int(sys.argv[2]))' "$OUTPUT_DIR" "$step"
fi
exit "$(cat "$FAKE/srun.status")"
'''


def _slurm_run(tmp_path: Path, status: int, new_step: int | None, env: dict | None = None) -> tuple[int, str, bool]:
    """One job run of the pretrain Slurm script whose step exits ``status`` after writing checkpoint ``new_step``:
    (exit status, output, requeued)."""
    fake = tmp_path / "fake"
    fake.mkdir(exist_ok=True)
    (fake / "new_step").write_text("" if new_step is None else str(new_step))
    (fake / "srun.status").write_text(str(status))
    process, _ = slurm_job(tmp_path, "pretrain/slurm_pretrain_frame64-s1t4.sh", srun=FAKE_SRUN_SAVING,
                           env={"PYTHON": sys.executable, **(env or {})})
    output = process.communicate(timeout=120)[0]
    requeued = (fake / "scontrol.calls").exists()
    for name in ("scontrol.calls", "srun.status", "new_step", "srun.args"):
        (fake / name).unlink(missing_ok=True)
    return process.returncode, output, requeued


def test_slurm_job_stops_requeueing_after_three_restarts_without_a_new_checkpoint(tmp_path):
    assert _slurm_run(tmp_path, STOPPED, new_step=2)[2]  # progress
    for _ in range(3):  # requeued three times in a row without a new checkpoint
        assert _slurm_run(tmp_path, STOPPED, new_step=None)[2]
    status, output, requeued = _slurm_run(tmp_path, STOPPED, new_step=None)  # and not a fourth
    assert status == STOPPED and not requeued
    assert "the last 4 runs of job 4242 ended without a new complete checkpoint (the newest is still step 2)" in output


def test_slurm_job_restart_with_a_new_checkpoint_resets_the_count(tmp_path):
    for _ in range(3):
        assert _slurm_run(tmp_path, STOPPED, new_step=None)[2]
    assert _slurm_run(tmp_path, STOPPED, new_step=4)[2]
    assert (tmp_path / "out" / "slurm_restarts_without_progress").exists() is False
    for _ in range(3):
        assert _slurm_run(tmp_path, STOPPED, new_step=None)[2]
    assert not _slurm_run(tmp_path, STOPPED, new_step=None)[2]
    status, _, requeued = _slurm_run(tmp_path, 0, new_step=None)  # a run that finishes clears the count
    assert status == 0 and not requeued and not (tmp_path / "out" / "slurm_restarts_without_progress").exists()


def test_slurm_restart_cap_is_set_by_max_restarts_without_progress(tmp_path):
    cap = {"MAX_RESTARTS_WITHOUT_PROGRESS": "1"}
    assert _slurm_run(tmp_path, STOPPED, new_step=None, env=cap)[2]  # requeued once without a new checkpoint
    assert not _slurm_run(tmp_path, STOPPED, new_step=None, env=cap)[2]


FAKE_SRUN_KILLED = '''#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE/srun.args"
while [[ ! -f "$FAKE/srun.status" ]]; do sleep 0.05; done
exit "$(cat "$FAKE/srun.status")"
'''
FAKE_SCANCEL_KILLS = '''#!/usr/bin/env bash
echo "$@" >> "$FAKE/scancel.calls"
echo 143 > "$FAKE/srun.status"
'''


def test_slurm_job_signalled_then_killed_before_its_checkpoint_is_requeued(tmp_path):
    # the stop's save outlasted the grace time: the previous complete checkpoint is still there to resume from
    process, fake = slurm_job(tmp_path, "pretrain/slurm_pretrain_frame64-s1t4.sh", srun=FAKE_SRUN_KILLED,
                              scancel=FAKE_SCANCEL_KILLS, env={"PYTHON": sys.executable})
    while not (fake / "srun.args").exists():
        assert process.poll() is None, process.communicate()[0]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 143, output
    assert "exited with 143 after the job was signalled" in output
    assert (fake / "scontrol.calls").read_text().split() == ["requeue", "4242"]


def test_slurm_job_that_fails_unsignalled_is_not_requeued_and_keeps_no_count(tmp_path):
    status, _, requeued = _slurm_run(tmp_path, 1, new_step=None)
    assert status == 1 and not requeued
    assert not (tmp_path / "out" / "slurm_restarts_without_progress").exists()


def test_newest_complete_step_cli_prints_the_step_or_nothing(tmp_path):
    from llava.train.checkpoints import write_completion_marker

    run = [sys.executable, "-m", "llava.train.checkpoints", str(tmp_path)]
    assert subprocess.run(run, capture_output=True, text=True, check=True).stdout == ""
    for step, complete in ((3, True), (5, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            write_completion_marker(tmp_path / f"checkpoint-{step}", step)
    assert subprocess.run(run, capture_output=True, text=True, check=True).stdout.strip() == "3"


def test_slurm_restart_cap_that_is_not_a_number_is_refused_naming_it(tmp_path):
    status, output, requeued = _slurm_run(tmp_path, STOPPED, new_step=None,
                                          env={"MAX_RESTARTS_WITHOUT_PROGRESS": "three"})
    assert status == 2 and not requeued
    assert "MAX_RESTARTS_WITHOUT_PROGRESS must be a whole number, got 'three'" in output
