"""The CI skip policy (tests/strict_skips.py): with SLOWFAST_NO_SKIPS=1 a skip outside the cuda marker fails."""

from __future__ import annotations

import pytest

SKIPPING_TESTS = """
import pytest

def test_needs_a_package():
    pytest.skip("frobnicate is not installed")

@pytest.mark.cuda
def test_needs_a_gpu():
    pytest.skip("needs a CUDA GPU")

def test_passes():
    pass
"""


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch):
    pytester.makeini("[pytest]\nmarkers =\n    cuda: needs a CUDA GPU\n")

    def run(strict: bool, **files: str) -> pytest.RunResult:
        monkeypatch.setenv("SLOWFAST_NO_SKIPS", "1" if strict else "0")
        pytester.makepyfile(**files)
        return pytester.runpytest("-p", "strict_skips", "-rA")

    return run


def test_in_ci_a_skip_outside_the_cuda_marker_fails_naming_the_test_and_reason(run):
    result = run(True, test_skips=SKIPPING_TESTS)
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*test_skips.py::test_needs_a_package was skipped outside the `cuda` marker*"
                                 "frobnicate is not installed*"])  # fmt: skip


def test_in_ci_a_module_level_importorskip_is_an_error(run):
    result = run(True, test_module=(
        'import pytest\npytest.importorskip("no_such_package_anywhere", reason="the x extra")\n'
        "def test_one():\n    pass\n"
    ))  # fmt: skip
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*module test_module.py was skipped outside the `cuda` marker*the x extra*"])


def test_outside_ci_skips_stay_skips(run):
    result = run(False, test_skips=SKIPPING_TESTS)
    result.assert_outcomes(passed=1, skipped=2)
