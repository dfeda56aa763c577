"""Stopping a run early with a checkpoint: on ``SIGUSR1`` / ``SIGTERM``, or before a wall-clock budget runs out.

A signal only sets a flag. At the end of every optimiser step the processes agree (an all-reduce of one
integer) on whether any of them was signalled or is about to exceed ``--max_train_hours``; if so every process
has finished the same step, the trainer saves one complete checkpoint and stops. The trainer then exits with
:data:`STOPPED_EXIT_STATUS` (under torchrun with 0, see ``llava.train.train``) and records the stop in
``OUTPUT_DIR/run_status.json``.
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

logger = logging.getLogger("llava.train")

__all__ = ["STOPPED_EXIT_STATUS", "StopCallback", "StopRequest"]

# EX_TEMPFAIL (sysexits.h): a temporary failure, run the same command again to continue.
STOPPED_EXIT_STATUS = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
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
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            logger.warning("received %s: finishing the current step, then saving a checkpoint and stopping", name)

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

    def reserve(self) -> float:
        """Time one more step and a checkpoint save need: the longest step so far, plus the longest save so far
        or the margin, whichever is longer."""
        return self.longest_step + max(self.margin, self.longest_save)

    def local_code(self) -> int:
        """0 to go on, else the code of this process's reason to stop."""
        if self.signal_name is not None:
            return _CODES[self.signal_name]
        left = self.seconds_left()
        if left is not None and left < self.reserve():
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
    """Asks the Trainer to save and stop at the end of the step where any process wants to stop."""

    def __init__(self, request: StopRequest) -> None:
        self.request = request
        self._since: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._since = self.request.clock()

    def on_step_end(self, args, state, control, **kwargs):
        request = self.request
        now = request.clock()
        if self._since is not None:
            request.record_step(now - self._since)
        code = _agree(request.local_code(), args.device)
        if code and request.reason is None:
            request.reason = _REASONS[code]
            request.stop_step = state.global_step
            left = request.seconds_left()
            logger.warning(
                "stopping after step %d (%s)%s: saving a checkpoint", state.global_step, request.reason,
                f", {left / 60:.1f} min of the budget left" if left is not None else "",
            )
            control.should_save = True
            control.should_training_stop = True
        self._since = request.clock()
        return control

    def on_save(self, args, state, control, **kwargs):
        # the next step's time starts after the save
        self._since = self.request.clock()
