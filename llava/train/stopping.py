"""Stopping a run early with a checkpoint: on ``SIGUSR1`` / ``SIGTERM``, or before a wall-clock budget runs out.

A signal only sets a flag (the handler neither logs nor allocates: it may interrupt anything, a write to the log
included); the "received" line is logged by the training loop. At the end of every optimiser step, and again
after every periodic save, the processes agree (an all-reduce of one integer) on whether any of them was
signalled or is about to exceed ``--max_train_hours``. At a step end every process has finished the same step:
the trainer saves one complete checkpoint and stops. After a periodic save the checkpoint just written is that
checkpoint: the run stops without another step or save. The trainer then exits with :data:`STOPPED_EXIT_STATUS`
(under torchrun with 0, see ``llava.train.train``) and records the stop in ``OUTPUT_DIR/run_status.json``.

DataLoader workers leave the decision to their trainer: they ignore both signals
(:mod:`llava.train.worker_signals`).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator

import torch
from transformers import TrainerCallback

from .worker_signals import STOP_SIGNALS

logger = logging.getLogger("llava.train")

__all__ = ["STOPPED_EXIT_STATUS", "StopCallback", "StopRequest"]

# EX_TEMPFAIL (sysexits.h): a temporary failure, run the same command again to continue.
STOPPED_EXIT_STATUS = 75
# Stop reasons by code; processes agree on the largest code any of them reports.
_REASONS = {1: "time budget (--max_train_hours)", 2: "SIGUSR1", 3: "SIGTERM"}
_CODES = {"SIGUSR1": 2, "SIGTERM": 3}


class StopRequest:
    """Whether this process wants the run to stop after the current step, and why.

    Args:
        max_train_hours: wall-clock budget from ``start``, or ``None``.
        margin_minutes: time kept back for the final save before any save was timed.
        clock: seconds, monotonic (``time.monotonic``).
        start: when the budget started, on ``clock`` (default: now).
    """

    def __init__(
        self,
        max_train_hours: float | None = None,
        margin_minutes: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        start: float | None = None,
    ) -> None:
        if max_train_hours is not None and not max_train_hours > 0:
            raise ValueError(f"--max_train_hours must be positive, got {max_train_hours}")
        if not margin_minutes >= 0:
            raise ValueError(f"--stop_margin_minutes must be >= 0, got {margin_minutes}")
        self.max_train_hours = max_train_hours
        self.margin = 60.0 * margin_minutes
        self.clock = clock
        self.start = clock() if start is None else start
        self.signal_name: str | None = None
        self._announced = False
        self.longest_step = 0.0
        self.longest_save = 0.0
        self.reason: str | None = None  # set once the processes agreed to stop
        self.stop_step: int | None = None

    # ---- inputs

    def record_step(self, seconds: float) -> None:
        self.longest_step = max(self.longest_step, seconds)

    def record_save(self, seconds: float) -> None:
        self.longest_save = max(self.longest_save, seconds)

    def _on_signal(self, signum: int, frame) -> None:
        # Only a flag: logging here could re-enter a write to the same stream that the signal interrupted.
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def announce(self) -> None:
        """Log, once, that a stop signal was received (called from the training loop, not the handler)."""
        if self.signal_name is not None and not self._announced:
            self._announced = True
            logger.warning(
                "received %s: finishing the current step, then saving a checkpoint and stopping", self.signal_name
            )

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[None]:
        """Catch ``SIGUSR1`` and ``SIGTERM`` (in the main thread) for the duration, then restore the handlers."""
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: SIGUSR1/SIGTERM will not stop the run with a checkpoint")
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # ---- decisions

    def seconds_left(self) -> float | None:
        """Seconds of the budget left, or ``None`` without a budget."""
        if self.max_train_hours is None:
            return None
        return 3600.0 * self.max_train_hours - (self.clock() - self.start)

    def reserve(self, saves_due: int = 1) -> float:
        """Time that going on needs before the run can stop: one more step (the longest so far) and ``saves_due``
        checkpoint saves (each the longest save so far or the margin, whichever is longer). Two saves are due when
        a periodic save comes before the next step: that one, and the final one."""
        return self.longest_step + saves_due * max(self.margin, self.longest_save)

    def local_code(self, saves_due: int = 1) -> int:
        """0 to go on, else the code of this process's reason to stop."""
        if self.signal_name is not None:
            self.announce()
            return _CODES[self.signal_name]
        left = self.seconds_left()
        if left is not None and left < self.reserve(saves_due):
            return 1
        return 0


def _agree(code: int, device: torch.device) -> int:
    """The largest ``code`` over all processes (``code`` itself without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return code
    if torch.distributed.get_world_size() == 1:
        return code
    value = torch.tensor([code], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value.item())


class StopCallback(TrainerCallback):
    """Asks the Trainer to stop at the end of the step where any process wants to stop (saving a checkpoint), or
    right after a periodic save (whose checkpoint then is the one to resume from).

    It must come after transformers' ``DefaultFlowCallback`` (the Trainer adds that one first): at a step end it
    reads ``control.should_save`` to know whether a periodic save is due before the next step."""

    def __init__(self, request: StopRequest) -> None:
        self.request = request
        self._since: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._since = self.request.clock()

    def _stop(self, state, code: int, when: str) -> None:
        request = self.request
        request.reason = _REASONS[code]
        request.stop_step = state.global_step
        left = request.seconds_left()
        logger.warning(
            "stopping after step %d (%s)%s: %s", state.global_step, request.reason,
            f", {left / 60:.1f} min of the budget left" if left is not None else "", when,
        )

    def on_step_end(self, args, state, control, **kwargs):
        request = self.request
        now = request.clock()
        if self._since is not None:
            request.record_step(now - self._since)
        saves_due = 2 if control.should_save else 1  # a periodic save now, then the final one after a step
        code = _agree(request.local_code(saves_due), args.device)
        if code and request.reason is None:
            self._stop(state, code, "saving a checkpoint")
            control.should_save = True
            control.should_training_stop = True
        self._since = request.clock()
        return control

    def on_save(self, args, state, control, **kwargs):
        # Every process saved (the save ends with a barrier). A signal that came during the save, or a budget that
        # no longer covers a step and a save, stops the run here: the checkpoint just written is complete.
        request = self.request
        if request.reason is None and not control.should_training_stop:
            code = _agree(request.local_code(), args.device)
            if code:
                self._stop(state, code, "the checkpoint just saved is complete")
                control.should_training_stop = True
        # the next step's time starts after the save
        self._since = request.clock()
        return control
