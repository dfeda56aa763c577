"""Run an lmms-eval command and turn its silent failures into a non-zero exit.

lmms-eval catches exceptions raised while a task is evaluated, logs ``Error during evaluation: ...`` and still
exits 0 without writing a results file. Scripts and schedulers then record a failed run as a success. This
wrapper runs the command (``python -m lmms_eval ...``, or the same under ``accelerate launch`` / ``torchrun``),
streams its output unchanged, and exits non-zero, with the reason on the last line of stderr, when

- the command itself exits non-zero;
- a line of its output reports an evaluation error;
- no new ``*_results.json`` appeared under the command's ``--output_path``, or one that did is unreadable or
  holds no results.

Usage::

    python -m llava.eval.checked_run -- python -m lmms_eval --model ... --tasks ... --output_path logs/eval
"""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence

# Substrings of lmms-eval's own messages that mean a task or the whole run failed.
ERROR_MARKERS = ("Error during evaluation",)

# Colour codes from loguru, removed from the reason line.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

EXIT_FAILED = 1
EXIT_USAGE = 2


class CheckedRunError(RuntimeError):
    """An lmms-eval run that failed; ``str()`` is the one-line reason."""


@dataclass
class _OutputScan:
    """Collects the first evaluation-error line seen in a stream of output lines."""

    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def feed(self, line: str) -> None:
        if any(marker in line for marker in ERROR_MARKERS):
            with self.lock:
                self.errors.append(line.strip())


def output_path_of(command: Sequence[str]) -> Path | None:
    """The ``--output_path`` that an lmms-eval command line gives (the last one wins, as in argparse)."""
    found: str | None = None
    for i, arg in enumerate(command):
        if arg == "--output_path" and i + 1 < len(command):
            found = command[i + 1]
        elif arg.startswith("--output_path="):
            found = arg.split("=", 1)[1]
    return Path(found) if found else None


def results_files(output_path: Path) -> list[Path]:
    """Every ``*_results.json`` that lmms-eval may have written under ``output_path``."""
    if output_path.is_file():  # lmms-eval accepts a file path and writes beside it
        output_path = output_path.parent
    if not output_path.is_dir():
        return []
    return sorted(output_path.rglob("*_results.json"))


def new_results(output_path: Path, before: dict[Path, float]) -> list[Path]:
    """Results files that did not exist, or were rewritten, since ``before`` was taken."""
    fresh = []
    for path in results_files(output_path):
        mtime = path.stat().st_mtime
        if path not in before or mtime > before[path]:
            fresh.append(path)
    return fresh


def snapshot(output_path: Path) -> dict[Path, float]:
    return {path: path.stat().st_mtime for path in results_files(output_path)}


def check_results_file(path: Path) -> list[str]:
    """The task names a results file reports; raises :class:`CheckedRunError` if it is unusable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckedRunError(f"unreadable results file {path}: {err}") from err
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or not results:
        raise CheckedRunError(f"results file {path} holds no results")
    return sorted(results)


def _pump(source: IO[bytes], sink: IO[str], scan: _OutputScan) -> None:
    for raw in iter(source.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        sink.write(line)
        sink.flush()
        scan.feed(line)
    source.close()


def run_checked(command: Sequence[str], env: dict[str, str] | None = None) -> list[Path]:
    """Run ``command`` and return the results files it wrote; raise :class:`CheckedRunError` on any failure."""
    if not command:
        raise ValueError("no command to run")
    output_path = output_path_of(command)
    if output_path is None:
        raise ValueError("the lmms-eval command has no --output_path, so its results cannot be checked")
    before = snapshot(output_path)
    # Files written within the clock's resolution of the start still count as new.
    time.sleep(0.01)
    scan = _OutputScan()
    proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, sys.stdout, scan), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, scan), daemon=True),
    ]
    for pump in pumps:
        pump.start()

    def forward(signum: int, _frame) -> None:  # a scheduler's SIGTERM reaches the evaluation too
        proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        returncode = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for pump in pumps:
        pump.join()

    if returncode != 0:
        raise CheckedRunError(f"exited with status {returncode}")
    if scan.errors:
        message = ANSI_ESCAPE.sub("", scan.errors[0])
        cut = min((i for i in (message.find(m) for m in ERROR_MARKERS) if i >= 0), default=0)
        raise CheckedRunError(message[cut:].strip())
    written = new_results(output_path, before)
    if not written:
        raise CheckedRunError(f"no results file was written under {output_path}")
    for path in written:
        check_results_file(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return EXIT_USAGE if not args else 0
    try:
        written = run_checked(args, env=dict(os.environ))
    except ValueError as err:
        print(f"lmms-eval not run: {err}", file=sys.stderr)
        return EXIT_USAGE
    except CheckedRunError as err:
        sys.stdout.flush()
        print(f"lmms-eval failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    for path in written:
        print(f"lmms-eval results: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
