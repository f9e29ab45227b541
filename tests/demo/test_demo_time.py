"""bench/demo_time.py: the commit and the dirty flag its records carry."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


@pytest.fixture(scope="module")
def demo_time():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("demo_time")
    finally:
        sys.path.remove(str(BENCH))


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def test_git_state_clean_dirty_and_own_results(demo_time, tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "one")
    head = _git(tmp_path, "rev-parse", "HEAD")
    assert demo_time.git_state(tmp_path) == {"commit": head, "dirty": False, "dirty_entries": []}

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "demo_time_x.json").write_text("{}")
    assert demo_time.git_state(tmp_path)["dirty"] is False  # the benchmark's own output

    (tmp_path / "notes.txt").write_text("")  # any other untracked file counts
    assert demo_time.git_state(tmp_path)["dirty_entries"] == ["notes.txt"]
    (tmp_path / "notes.txt").unlink()

    (tmp_path / "src" / "a.py").write_text("x = 2\n")  # an edit outside src/ would count too
    state = demo_time.git_state(tmp_path)
    assert state == {"commit": head, "dirty": True, "dirty_entries": ["src/a.py"]}


def test_git_state_outside_a_checkout(demo_time, tmp_path: Path) -> None:
    assert demo_time.git_state(tmp_path) == {"commit": None, "dirty": None, "dirty_entries": []}
