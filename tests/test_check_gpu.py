"""scripts/check_gpu.sh without a GPU: its own logic (prerequisites installed offline from a wheel folder, every
step run with a time limit, the summary) on the CPU (CHECK_DEVICE=cpu), so that it cannot rot between GPU runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREREQS = ROOT / "scripts" / "deps" / "gpu_prereqs.sh"


def fake_wheel(folder: Path, module: str) -> Path:
    """A minimal pure-Python wheel whose module says its name."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{module}-1.0.dist-info"
    path = folder / f"{module}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{module}/__init__.py", f"NAME = {module!r}\n")
        wheel.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
        wheel.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist}/RECORD", "")
    return path


def prereqs(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(PREREQS), sys.executable, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_a_missing_module_is_installed_offline_from_the_wheel_folder_into_its_own_site(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    fake_wheel(wheels, "slowfast_gpu_probe")
    proc = prereqs(str(wheels), str(site), "json", "slowfast_gpu_probe")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(site)
    assert "installing slowfast_gpu_probe from" in proc.stderr  # json was there already
    check = subprocess.run([sys.executable, "-c", "import slowfast_gpu_probe as m; print(m.NAME)"],
                           env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)  # fmt: skip
    assert check.stdout.strip() == "slowfast_gpu_probe"


def test_present_modules_need_no_wheels(tmp_path):
    proc = prereqs(str(tmp_path / "no-wheels"), str(tmp_path / "site"), "json", "pytest")
    assert (proc.returncode, proc.stdout) == (0, "")


def test_a_missing_module_without_wheels_fails_saying_how_to_bring_it(tmp_path):
    proc = prereqs(str(tmp_path / "no-wheels"), str(tmp_path / "site"), "slowfast_not_a_module")
    assert proc.returncode == 1
    assert "cannot import slowfast_not_a_module" in proc.stderr and "scripts/deps/gpu_wheels.sh" in proc.stderr


def test_check_gpu_runs_every_step_on_the_cpu(tmp_path):
    env = {**os.environ, "CHECK_DEVICE": "cpu", "PYTHON": sys.executable, "BENCH_ONLY": "vision",
           "GPU_WHEELS": str(tmp_path / "no-wheels"),
           # the logic is under test, not the speed: room for a busy CPU
           "TEST_TIMEOUT": "400", "FLASH_TEST_TIMEOUT": "400", "CLI_TIMEOUT": "400", "BENCH_TIMEOUT": "400"}  # fmt: skip
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "check_gpu.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout[proc.stdout.index("==== check_gpu summary"):]
    assert re.search(r"pytest -m cuda tests/test_cuda.py: \d+ skipped", summary)  # no GPU: every one skips
    for line in ("CHECK_DEVICE=cpu",
                 "pytest tests/test_flash_varlen.py: 12 passed", "cli (sdpa)", "model loading:", "(cpu,",
                 "python -m benchmarks --smoke --device cpu", "--only vision"):  # fmt: skip
        assert line in summary, line
    assert (tmp_path / "out" / "benchmarks" / "results.md").is_file()
    assert (tmp_path / "out" / "check_gpu.log").read_text().count("---- ") >= 5  # every step logged


def test_check_gpu_refuses_an_unknown_device(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "check_gpu.sh"), str(tmp_path)],
                          env={**os.environ, "CHECK_DEVICE": "tpu"}, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1 and "CHECK_DEVICE must be cuda or cpu" in proc.stderr
