"""Command-line pieces shared by the front ends (``llava.serve.cli`` and ``llava.serve.gradio_web``).

An :class:`ArgumentParser` that reports a bad command line as one :class:`UsageError` instead of printing the
usage block and exiting, ``type=`` validators for numeric options (their messages end up in the ``error:`` line),
:func:`fail` to print that line, :func:`check_model_path` to catch a missing checkpoint before the slow model load,
and :func:`quiet_libraries` to keep Hugging Face's progress bars and warnings off the terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings
from collections.abc import Iterator
from typing import NoReturn

from llava.model.builder import CheckpointError

__all__ = [
    "EXIT_BAD_INPUT",
    "ArgumentParser",
    "UsageError",
    "check_model_path",
    "fail",
    "finite_float",
    "non_negative_float",
    "one_line",
    "positive_float",
    "positive_int",
    "probability",
    "quiet_libraries",
]

EXIT_BAD_INPUT = 2


class UsageError(Exception):
    """A bad command line, reported as one ``error:`` line."""


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose errors raise :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        """Raise :class:`UsageError` with argparse's message (``--help`` still exits through ``SystemExit``)."""
        raise UsageError(message)


def positive_int(text: str) -> int:
    """Parse an integer > 0 (an ``argparse`` ``type=``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    """Parse a finite number, refusing ``nan`` and ``inf`` (an ``argparse`` ``type=``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """Parse a finite number >= 0 (an ``argparse`` ``type=``)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def positive_float(text: str) -> float:
    """Parse a finite number > 0 (an ``argparse`` ``type=``)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def probability(text: str) -> float:
    """Parse a number in (0, 1] (an ``argparse`` ``type=``)."""
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value


def one_line(message: object) -> str:
    """``message`` as text with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(message).split())


def fail(message: object) -> int:
    """Print ``error: MESSAGE`` as a single line on stderr and return :data:`EXIT_BAD_INPUT`."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


def check_model_path(model_path: str) -> None:
    """Raise :class:`CheckpointError` for a local checkpoint path that does not exist (hub ids are left alone)."""
    # a hub id is "name" or "org/name"; anything deeper or anchored is a local path
    looks_local = model_path.startswith((".", "/", "~")) or model_path.strip("/").count("/") >= 2
    if looks_local and not os.path.exists(os.path.expanduser(model_path)):
        raise CheckpointError(f"checkpoint '{model_path}' does not exist")


@contextlib.contextmanager
def quiet_libraries(verbose: bool) -> Iterator[None]:
    """No progress bars; library warnings only when ``verbose``. Restores the previous settings."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as hf_logging

    level = hf_logging.WARNING if verbose else hf_logging.ERROR
    verbosity, hub_verbosity = hf_logging.get_verbosity(), hub_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity(level)
    hub_logging.set_verbosity(level)  # e.g. its "Retrying in 1s" lines while a hub id cannot be reached
    hf_logging.disable_progress_bar()  # the hub's bars too
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hub_logging.set_verbosity(hub_verbosity)
        if bars:
            hf_logging.enable_progress_bar()
