"""The pinned environment (constraints.txt), pyproject.toml's ranges, and CI running the README's command."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKED_EXTRAS = ("train", "eval", "test", "bench", "demo", "serve")  # gpu (flash-attn) needs CUDA to build


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements() -> list[Requirement]:
    data = project()
    lines = list(data["dependencies"])
    for extra in LOCKED_EXTRAS:
        lines += data["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def pins() -> dict[str, Version]:
    found: dict[str, Version] = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert match, f"constraints.txt line {number} is not an exact pin: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in found, f"constraints.txt pins {name} twice"
        found[name] = Version(match.group(2))
    return found


def test_every_dependency_of_the_locked_extras_is_pinned():
    locked = pins()
    missing = sorted({canonicalize_name(r.name) for r in requirements() if r.marker is None or r.marker.evaluate()} - set(locked))
    assert not missing, f"constraints.txt does not pin {missing}: rerun scripts/deps/lock.sh"


def test_every_pin_lies_inside_the_pyproject_range():
    locked = pins()
    for req in requirements():
        name = canonicalize_name(req.name)
        if name in locked:
            assert req.specifier.contains(locked[name], prereleases=True), f"{name}=={locked[name]} is outside {req}"


def test_filelock_is_capped_below_the_release_that_breaks_lmms_eval():
    (filelock,) = [Requirement(r) for r in project()["optional-dependencies"]["eval"] if r.startswith("filelock")]
    assert not filelock.specifier.contains("4.3.1") and filelock.specifier.contains("4.2.12")


def test_the_project_itself_and_pip_are_not_pinned():
    assert not {"slowfast-llava", "pip"} & set(pins())


def readme_test_command() -> str:
    text = (ROOT / "README.md").read_text()
    commands = [line for line in text.splitlines() if line.startswith("python3 -m venv") and "pytest" in line]
    assert len(commands) == 1, f"README.md should give one test command, found {commands}"
    return commands[0]


def test_ci_runs_exactly_the_readme_test_command():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert readme_test_command() in ci


@pytest.mark.parametrize("command", ["test", "cli"])
def test_the_readme_commands_install_with_the_lock(command):
    text = (ROOT / "README.md").read_text()
    line = readme_test_command() if command == "test" else next(
        line for line in text.splitlines() if line.startswith("python3 -m venv") and "llava.serve.cli" in line
    )
    assert "pip install -c constraints.txt -e " in line


def test_no_test_reads_files_beside_the_repository():
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        text = path.read_text()
        assert "../shared" not in text and '"shared" / "fixtures"' not in text, f"{path.name} reads ../shared"
