"""``llava.eval.checked_run``: an lmms-eval run that fails inside exits non-zero with the reason on one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval import checked_run

ROOT = Path(__file__).resolve().parents[1]


def fake_lmms_eval(tmp_path: Path, body: str) -> list[str]:
    """A command that behaves like lmms-eval as ``body`` says; ``OUT`` is its ``--output_path``."""
    script = tmp_path / "fake_lmms_eval.py"
    script.write_text("import json, sys, pathlib\nOUT = pathlib.Path(sys.argv[sys.argv.index('--output_path') + 1])\n" + body)
    return [sys.executable, str(script), "--tasks", "toy", "--output_path", str(tmp_path / "out")]


WRITE_RESULTS = """
folder = OUT / "model"
folder.mkdir(parents=True, exist_ok=True)
(folder / "20261129_results.json").write_text(json.dumps({"results": {"toy": {"acc,none": 0.5}}}))
"""


def run_main(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava.eval.checked_run", "--", *command], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_a_run_that_writes_results_succeeds_and_names_the_file(tmp_path):
    proc = run_main(fake_lmms_eval(tmp_path, WRITE_RESULTS + "print('toy | 0.5')\n"))
    assert proc.returncode == 0, proc.stderr
    assert "toy | 0.5" in proc.stdout  # output is passed through
    assert last_line(proc.stderr) == f"lmms-eval results: {tmp_path / 'out' / 'model' / '20261129_results.json'}"


def test_a_logged_evaluation_error_fails_even_with_exit_status_zero(tmp_path):
    logged = "\x1b[31mERROR | lmms_eval.__main__ - Error during evaluation: No module named 'filelock._api'. Please set --verbosity=DEBUG\x1b[0m"
    body = WRITE_RESULTS + f"print({logged!r}, file=sys.stderr)\n"
    proc = run_main(fake_lmms_eval(tmp_path, body))
    assert proc.returncode == checked_run.EXIT_FAILED
    assert last_line(proc.stderr) == (
        "lmms-eval failed: Error during evaluation: No module named 'filelock._api'. Please set --verbosity=DEBUG"
    )


def test_a_run_that_writes_no_results_file_fails(tmp_path):
    proc = run_main(fake_lmms_eval(tmp_path, "print('nothing to see')\n"))
    assert proc.returncode == checked_run.EXIT_FAILED
    assert last_line(proc.stderr) == f"lmms-eval failed: no results file was written under {tmp_path / 'out'}"


def test_an_old_results_file_does_not_count_as_this_runs(tmp_path):
    subprocess.run(fake_lmms_eval(tmp_path, WRITE_RESULTS), check=True)
    proc = run_main(fake_lmms_eval(tmp_path, "pass\n"))
    assert proc.returncode == checked_run.EXIT_FAILED
    assert "no results file was written" in last_line(proc.stderr)


def test_a_non_zero_exit_status_fails_with_it(tmp_path):
    proc = run_main(fake_lmms_eval(tmp_path, WRITE_RESULTS + "sys.exit(3)\n"))
    assert proc.returncode == checked_run.EXIT_FAILED
    assert last_line(proc.stderr) == "lmms-eval failed: exited with status 3"


@pytest.mark.parametrize("content, reason", [("{not json", "unreadable results file"), ('{"results": {}}', "holds no results")])
def test_a_broken_results_file_fails(tmp_path, content, reason):
    body = f"folder = OUT / 'm'\nfolder.mkdir(parents=True)\n(folder / 'x_results.json').write_text({content!r})\n"
    proc = run_main(fake_lmms_eval(tmp_path, body))
    assert proc.returncode == checked_run.EXIT_FAILED
    assert reason in last_line(proc.stderr)


def test_a_command_without_output_path_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    proc = run_main([sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    assert proc.returncode == checked_run.EXIT_USAGE
    assert "no --output_path" in last_line(proc.stderr)
    assert not marker.exists()


def test_the_last_output_path_wins_as_in_argparse():
    command = ["lmms_eval", "--output_path", "a", "--tasks", "t", "--output_path=b"]
    assert checked_run.output_path_of(command) == Path("b")


def test_results_are_returned_from_the_python_api(tmp_path):
    written = checked_run.run_checked(fake_lmms_eval(tmp_path, WRITE_RESULTS))
    assert [p.name for p in written] == ["20261129_results.json"]
    assert json.loads(written[0].read_text())["results"]["toy"]["acc,none"] == 0.5
