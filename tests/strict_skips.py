"""pytest plugin (loaded by conftest.py): with ``SLOWFAST_NO_SKIPS=1``, as ``.ci/run`` sets it, a test or module
that skips outside the ``cuda`` marker fails, naming the test and the reason it gave.

A skip in CI hides a missing dependency or a broken install (lmms-eval failing to import once turned 32 tests into
one skip); every optional package a test needs is installed by the lane that runs it, so there a skip is an error.
"""

from __future__ import annotations

import os

import pytest

ENV = "SLOWFAST_NO_SKIPS"


def _enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def _reason(report: pytest.BaseReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail(report: pytest.BaseReport, what: str) -> None:
    reason = _reason(report)
    report.outcome = "failed"
    report.longrepr = (
        f"{what} was skipped outside the `cuda` marker, which {ENV}=1 (CI) does not allow: {reason}\n"
        "Install what it needs in the lane that runs it, or mark it `cuda` if it needs a GPU."
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    if (
        _enabled()
        and report.skipped
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker("cuda") is None
    ):
        _fail(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    report = outcome.get_result()
    if _enabled() and report.skipped:  # a module-level importorskip / skip(allow_module_level=True)
        _fail(report, f"module {collector.nodeid}")
