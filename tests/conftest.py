"""Session hooks for the test suite.

``POLYAK_TEST_LOG=<path>``: each test's outcome and duration, and each failure's traceback, are
appended to that file the moment the test ends. The GPU checks (``bench/gpu_checks.sh tests``) set
it: a device call stopped at its time limit returns the failures seen so far, which pytest's own
summary (printed only at the end) would have lost.
"""

from __future__ import annotations

import os

import pytest


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get("POLYAK_TEST_LOG")
    # under xdist every report reaches the controller too: write it there once
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when != "call" and not report.failed:
        return
    with open(path, "a", encoding="utf-8") as log:
        log.write(
            f"{report.outcome.upper()} {report.nodeid} ({report.when}, {report.duration:.1f} s)\n"
        )
        if report.failed:
            log.write(report.longreprtext[-6000:] + "\n\n")
