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


# ------------------------------------------------------------------------------------------ CI lanes
def test_transformers_and_av_have_no_upper_cap():
    for name in ("transformers", "av"):
        (req,) = [r for r in requirements() if canonicalize_name(r.name) == name]
        assert not [s for s in req.specifier if s.operator in ("<", "<=", "==", "~=")], f"{req} is capped"


def test_ci_runs_every_lane_script_and_fails_on_skips():
    ci = (ROOT / ".ci" / "run").read_text()
    lanes = sorted(path.name for path in (ROOT / ".ci").glob("lane_*.sh"))
    assert lanes, "no lane scripts under .ci/"
    for lane in lanes:
        assert f"bash .ci/{lane} ||" in ci, f".ci/run does not run .ci/{lane}"
    assert "export SLOWFAST_NO_SKIPS=1" in ci
    assert "bash .ci/install_chromium.sh" in ci and "warning" not in ci.lower()


def test_the_release_lanes_run_test_files_that_exist():
    text = (ROOT / ".ci" / "release_lane.sh").read_text()
    listed = re.findall(r"tests/test_\w+\.py", text)
    assert len(listed) >= 10
    missing = [name for name in listed if not (ROOT / name).is_file()]
    assert not missing, missing


def test_chromium_install_fails_loudly_where_it_cannot_install(tmp_path):
    import subprocess

    bin_dir = tmp_path / "bin"  # a PATH with bash but no apt-get
    bin_dir.mkdir()
    (bin_dir / "bash").symlink_to("/bin/bash")
    env = {"PATH": str(bin_dir), "CHROMIUM_PATH": str(tmp_path / "no-chromium")}
    proc = subprocess.run(["/bin/bash", str(ROOT / ".ci" / "install_chromium.sh")], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert "no apt-get" in proc.stderr and "no-chromium" in proc.stderr


def test_lower_bounds_pin_the_oldest_release_each_range_admits(tmp_path):
    from scripts.deps.lower_bounds import lower_bounds

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = ["transformers>=5.4", "av>=14.1,!=15.0", "torch"]\n'
        '[project.optional-dependencies]\neval = ["lmms-eval>=0.7.3,<0.8"]\n'
    )
    assert lower_bounds(["transformers", "av", "lmms_eval"], pyproject) == [
        "transformers==5.4", "av==14.1", "lmms_eval==0.7.3"
    ]
    with pytest.raises(SystemExit, match="torch has no lower bound"):
        lower_bounds(["torch"], pyproject)
    with pytest.raises(SystemExit, match="numpy is not a dependency"):
        lower_bounds(["numpy"], pyproject)


def test_drift_names_each_package_that_moved_against_the_lock(tmp_path):
    from scripts.deps.drift import drift, pins

    lock, freeze = tmp_path / "lock.txt", tmp_path / "freeze.txt"
    lock.write_text("# pinned\nav==15.1.0\ntransformers==5.23.0\ntorch==2.14.1\nold-thing==1.0\n")
    freeze.write_text("av==18.1.0\nTransformers==5.25.0\ntorch==2.14.1\nkernels==0.19.1\npip==24.0\n")
    lines = drift(pins(freeze), pins(lock))
    assert lines[0].startswith("2 of 4 pinned packages differ")
    assert lines[1:] == ["  av: 15.1.0 -> 18.1.0", "  transformers: 5.23.0 -> 5.25.0", "  + kernels 0.19.1",
                         "  - old-thing 1.0"]  # fmt: skip
