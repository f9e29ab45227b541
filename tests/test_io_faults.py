"""Fault injection: a process killed with SIGKILL at a random moment while it saves, over and over.

Whatever the moment, the file must afterwards load and equal the version before the save that was
interrupted or the version it was writing, and at most one temporary file (``<path>.tmp``) may be
left, which the next save removes. Savers are forked from a server that has already imported
torch (tests/_crash_server.py), so a trial costs a fork, a few saves and a kill; the kill comes
after 0, 1 or 2 completed saves, at a moment drawn uniformly over the next save and a little more
(a save's duration is measured first), so most kills land inside a save, at every stage of it.

CI runs 40 trials for each kind of file (``ema.save_state`` and ``ema.save``); the slow variant
200. The fsync calls themselves are checked in tests/test_io.py, by patching ``os.fsync``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import polyak

HERE = Path(__file__).parent
pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or sys.platform == "win32", reason="needs fork and SIGKILL (POSIX)"
)


def _server_module() -> Any:
    spec = importlib.util.spec_from_file_location("_crash_server", HERE / "_crash_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


crash = _server_module()


@pytest.fixture(scope="module")
def server():
    env = dict(os.environ)
    src = str(Path(polyak.__file__).resolve().parents[1])  # the polyak this test imports
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "_crash_server.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )

    def ask(**command: Any) -> dict[str, Any]:
        proc.stdin.write(json.dumps(command) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, f"the crash server died (exit code {proc.poll()})"
        return json.loads(line)

    yield ask
    proc.stdin.close()
    proc.wait(timeout=60)


class Versions:
    """Version ``n`` of the run the savers save, rebuilt here: its state dict and its export."""

    def __init__(self) -> None:
        self.model, self.ema = crash.run()
        self.states: list[dict[str, Any]] = []
        self.exports: list[dict[str, torch.Tensor]] = []
        self._keep()

    def _keep(self) -> None:
        self.states.append(
            {
                "step": self.ema.step,
                "shadows": {n: self.ema.average(n).clone() for n in self.ema.names()},
            }
        )
        self.exports.append({k: v.clone() for k, v in self.ema.export_state_dict().items()})

    def upto(self, n: int) -> None:
        while len(self.states) <= n:
            crash.advance(self.model, self.ema)
            self._keep()

    def which(self, kind: str, path: Path, candidates: list[int]) -> int | None:
        """Which of the ``candidates`` versions the file at ``path`` holds (``None``: none)."""
        if kind == "state":
            fresh = crash.run()[1]
            fresh.load_state(path)
            for n in candidates:
                want = self.states[n]
                if fresh.step == want["step"] and all(
                    torch.equal(fresh.average(k), v) for k, v in want["shadows"].items()
                ):
                    return n
            return None
        from safetensors.torch import load_file

        got = load_file(path)
        for n in candidates:
            want = self.exports[n]
            if got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want):
                return n
        return None


def run_trials(server, tmp_path: Path, kind: str, trials: int, seed: int) -> dict[str, int]:
    """The trials; returns how they ended (printed with ``pytest -s``)."""
    rng = random.Random(seed)
    seconds = server(op="calibrate", kind=kind, dir=str(tmp_path))["seconds"]
    versions = Versions()
    zero = crash.run()[1]
    outcomes = {"old file, temporary left": 0, "old file": 0, "new file": 0}
    for t in range(trials):
        directory = tmp_path / f"{kind}{t}"
        directory.mkdir()
        path = directory / "out"
        crash.save(kind, zero, str(path))  # version 0
        # after 0, 1 or 2 completed saves, a moment drawn over the next save and a bit more
        # (after 0: the child's start too, a few ms without a thread pool)
        answer = server(
            op="trial",
            kind=kind,
            dir=str(directory),
            after=rng.randrange(3),
            delay=rng.uniform(0, 1.2) * seconds,
        )
        assert answer["signal"] == 9, f"the saver died on its own: {answer}"
        done = answer["done"]
        left = sorted(p.name for p in directory.iterdir())
        assert set(left) <= {"out", "out.tmp"}, left  # at most the one temporary file
        versions.upto(done + 1)
        found = versions.which(kind, path, [done, done + 1])
        assert found is not None, (
            f"trial {t}: the file holds neither version {done} nor {done + 1} after a kill"
        )
        if found == done + 1:  # killed after the rename, before the child reported it
            outcomes["new file"] += 1
        else:
            outcomes["old file, temporary left" if "out.tmp" in left else "old file"] += 1
        if "out.tmp" in left:  # the next save takes the temporary file away
            crash.save(kind, versions.ema, str(path))
            assert sorted(p.name for p in directory.iterdir()) == ["out"]
            assert versions.which(kind, path, [len(versions.states) - 1]) is not None
    print(kind, outcomes)
    # a temporary file left means the kill landed inside a save, after its file was created
    assert outcomes["old file, temporary left"] >= 1, "no kill landed inside a save"
    return outcomes


@pytest.mark.parametrize("kind", ["state", "export"])
def test_a_killed_save_leaves_the_old_or_the_new_file(server, tmp_path, kind):
    run_trials(server, tmp_path, kind, trials=40, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["state", "export"])
def test_a_killed_save_leaves_the_old_or_the_new_file_many_times(server, tmp_path, kind):
    run_trials(server, tmp_path, kind, trials=200, seed=1)
