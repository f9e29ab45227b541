"""Session hooks for the test suite.

``POLYAK_TEST_LOG=<path>``: each test's outcome and duration, and each failure's traceback, are
appended to that file the moment the test ends. The GPU checks (``bench/gpu_checks.sh tests``) set
it: a device call stopped at its time limit returns the failures seen so far, which pytest's own
summary (printed only at the end) would have lost.

``@pytest.mark.slow``: long variants (many fuzz cases, fault-injection trials, soak runs), skipped
unless ``--runslow`` is given or ``POLYAK_SLOW=1`` is set; CI runs the fast variants.

``ranks2``, ``ranks4``: what every distributed scenario saw on 2 and on 4 spawned gloo ranks, one
launch per world size for the session (``tests/_distributed.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a long variant, run with --runslow or POLYAK_SLOW=1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or os.environ.get("POLYAK_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or POLYAK_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def ranks2(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    from tests._distributed import launch

    return launch(2, tmp_path_factory.mktemp("ranks2"))


@pytest.fixture(scope="session")
def ranks4(tmp_path_factory: pytest.TempPathFactory, ranks2: list[dict]) -> list[dict]:
    """The 4-rank launch, after the 2-rank one (it loads that launch's DCP checkpoint)."""
    from tests._distributed import launch

    checkpoint = ranks2[0]["test_distributed.train_fsdp2"].get("checkpoint", "")
    return launch(4, tmp_path_factory.mktemp("ranks4"), {"checkpoint": checkpoint})


# what reads a tensor's value on the host: on CUDA each of these waits for the device
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@pytest.fixture
def no_host_reads():
    """A context manager: inside it, reading any tensor's value on the host fails the test.

    The update paths that must never synchronise (capturable weights, gates, the BatchNorm
    monitor) are checked on the CPU this way; on CUDA, ``torch.cuda.set_sync_debug_mode`` checks
    the same. Raises ``pytest.fail``'s exception, which no ``except Exception`` can swallow.
    """

    @contextlib.contextmanager
    def forbid() -> Iterator[None]:
        with pytest.MonkeyPatch.context() as patch:
            for name in HOST_READS:
                patch.setattr(
                    torch.Tensor,
                    name,
                    lambda *a, _n=name, **k: pytest.fail(f"a tensor was read on the host: {_n}"),
                )
            yield

    return forbid
