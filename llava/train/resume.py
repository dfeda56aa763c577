"""Where a run resumes, decided once for every process, before the model is built.

Rank 0 alone looks at the output folder (a file system that lags on one node must not split the run between two
checkpoints), checks the chosen checkpoint's record against this run (:mod:`llava.train.run_record`), sets aside
the complete checkpoints newer than it when the run rolls back (``--resume_from_checkpoint`` older than them), and
broadcasts its decision; every process then resumes from the same checkpoint or refuses with the same message.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from .checkpoints import (
    checkpoint_problem,
    checkpoint_step,
    find_resume_checkpoint,
    list_checkpoints,
    read_run_record,
    set_aside,
)
from .run_record import resume_mismatches

logger = logging.getLogger("llava.train")

__all__ = ["RunRefused", "agreed", "choose_resume", "decide_resume"]

T = TypeVar("T")


class RunRefused(ValueError):
    """Every process refuses to run, for the same reason (bad arguments or data, a checkpoint that does not fit)."""


@dataclass
class ResumeDecision:
    """Rank 0's decision: the checkpoint (``None``: from the start) or a refusal, and what to log."""

    checkpoint: str | None = None
    refusal: str | None = None
    log: list[tuple[int, str]] = field(default_factory=list)  # (logging level, message)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def decide_resume(output_dir: str, explicit: str | None, run: dict, allow_mismatch: bool) -> ResumeDecision:
    """The checkpoint to resume from, as seen from this process, checked against ``run`` (this run's record).

    ``explicit`` (``--resume_from_checkpoint``) is taken whatever its state (with a warning when incomplete);
    otherwise the newest complete ``checkpoint-*`` of ``output_dir``. A checkpoint whose record differs from
    ``run`` is refused (the message names each difference), unless ``allow_mismatch`` and the differences are
    ones a run can resume across; a changed world size or ZeRO stage is always refused.
    """
    decision = ResumeDecision()
    if explicit:
        if not os.path.isdir(explicit):
            decision.refusal = f"--resume_from_checkpoint {explicit}: no such folder"
            return decision
        problem = checkpoint_problem(explicit)
        if problem:
            decision.log.append((logging.WARNING, (f"resuming from {explicit} as asked by --resume_from_checkpoint, "
                                                   f"although {problem}")))
        else:
            decision.log.append((logging.INFO, f"resuming from {explicit} (--resume_from_checkpoint)"))
        decision.checkpoint = explicit
    else:
        path, skipped = find_resume_checkpoint(output_dir)
        decision.log += [(logging.WARNING, f"not resuming from {other}: {why}") for other, why in skipped]
        if path:
            decision.log.append((logging.INFO, f"resuming from {path}: the newest complete checkpoint"))
        elif skipped:
            decision.log.append((logging.WARNING, f"no complete checkpoint in {output_dir}: training from the start"))
        decision.checkpoint = path
    if decision.checkpoint is None:
        return decision

    recorded = read_run_record(decision.checkpoint)
    if recorded is None:
        decision.log.append((logging.WARNING, (f"{decision.checkpoint} records no run settings (written before "
                                               "they were recorded, or incomplete): not checked against this run")))
        return decision
    unsupported, differences, allowed = resume_mismatches(recorded, run)
    for item in allowed:
        decision.log.append((logging.WARNING, f"resuming with another run length: {item}"))
    if unsupported:
        decision.refusal = (
            f"cannot resume from {decision.checkpoint}: {'; '.join(unsupported + differences)}. A checkpoint's "
            "optimizer states are sharded for its process count and ZeRO stage: resume with the same ones, or start a "
            "new run (another --output_dir) from its weights"
        )
    elif differences and not allow_mismatch:
        decision.refusal = (
            f"cannot resume from {decision.checkpoint}: this run differs from the one that wrote it: "
            f"{'; '.join(differences)}. Resume with the same settings, or pass --allow_resume_mismatch True to "
            "resume anyway"
        )
    elif differences:
        decision.log.append((logging.WARNING, (f"resuming from {decision.checkpoint} although this run differs from "
                                               f"the one that wrote it (--allow_resume_mismatch): "
                                               f"{'; '.join(differences)}")))
    return decision


def _set_aside_newer(output_dir: str, checkpoint: str) -> None:
    """Set aside every complete checkpoint of ``output_dir`` newer than ``checkpoint`` (a rollback)."""
    step = checkpoint_step(checkpoint)
    if step is None:
        step = -1  # a folder of another name: every complete checkpoint of the output folder is newer work
    for other_step, other in list_checkpoints(output_dir):
        if other_step > step and os.path.abspath(other) != os.path.abspath(checkpoint) \
                and checkpoint_problem(other) is None:
            set_aside(other, f"newer than {checkpoint}, which --resume_from_checkpoint rolls the run back to")


def choose_resume(training_args, run: dict) -> str | None:
    """Where every process resumes: rank 0 decides (:func:`decide_resume`), sets aside newer complete checkpoints on
    a rollback, and broadcasts the decision.

    Raises:
        RunRefused: on every process, with rank 0's message, when the checkpoint does not fit this run.
    """
    decision = None
    if not _distributed() or torch.distributed.get_rank() == 0:
        try:
            decision = decide_resume(training_args.output_dir, training_args.resume_from_checkpoint, run,
                                     getattr(training_args, "allow_resume_mismatch", False))
            for level, message in decision.log:
                logger.log(level, "%s", message)
            if decision.refusal is None and decision.checkpoint and training_args.resume_from_checkpoint:
                _set_aside_newer(training_args.output_dir, decision.checkpoint)
        except OSError as err:  # the others wait for the broadcast: refuse with them rather than leave them hanging
            decision = ResumeDecision(refusal=f"cannot choose a checkpoint in {training_args.output_dir}: {err}")
    if _distributed():
        box = [decision]
        torch.distributed.broadcast_object_list(box, src=0)
        decision = box[0]
    if decision.refusal is not None:
        raise RunRefused(decision.refusal)
    return decision.checkpoint


def agreed(step: Callable[[], T]) -> T:
    """Run ``step`` (one with no collective inside) on every process; if it raises ``ValueError`` or ``OSError``
    (a missing file or model) on any process, raise :class:`RunRefused` with the first such message on all of
    them, so that the processes refuse together rather than some waiting for the others in the next collective."""
    try:
        result, problem = step(), None
    except (ValueError, OSError) as err:
        result, problem = None, str(err) or type(err).__name__
    if _distributed():
        problems = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(problems, problem)
        problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        raise RunRefused(problem)
    return result
