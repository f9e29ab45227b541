"""Resume after a kill: a training run killed (SIGKILL) mid-run and resumed from its last polyak
checkpoint ends with averages bit-identical to a run that was never interrupted.

The run (tests/_train_script.py) checkpoints model, optimizer and EMA in one ``polyak.io.save``
file every 5 steps; the kill comes at a random moment after a chosen checkpoint was reported, so it
may land between checkpoints or in the middle of writing one (which then leaves the previous one).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import polyak

SCRIPT = Path(__file__).with_name("_train_script.py")
STEPS = 400


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(polyak.__file__).resolve().parents[1])  # the polyak this test imports
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def _averages(path: Path) -> dict[str, torch.Tensor]:
    state = polyak.io.load(path)
    return {f"{slot}/{n}": t for slot, d in state["shadows"].items() for n, t in d.items()} | {
        f"copies/{n}": t for n, t in state["copies"].items()
    }


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_and_resumed_run_ends_bit_identical(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir()
    broken.mkdir()
    uninterrupted = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(whole), str(STEPS)], env=_env(), stdout=subprocess.PIPE
    )
    victim = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(broken), str(STEPS)],
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    rng = random.Random(0)
    target = rng.randrange(50, STEPS // 2, 5)
    for line in victim.stdout:  # wait until the chosen checkpoint is on disk
        if line.strip() == f"saved {target}":
            break
    time.sleep(rng.uniform(0, 0.05))  # then kill it somewhere in the next steps or saves
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (broken / "final").exists()
    assert set(os.listdir(broken)) <= {"ckpt", "ckpt.tmp"}
    resumed = subprocess.run(
        [sys.executable, str(SCRIPT), str(broken), str(STEPS), "--resume"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert uninterrupted.wait(timeout=300) == 0
    first_saved = int(resumed.stdout.split()[1]) if resumed.stdout.startswith("saved") else STEPS
    assert first_saved > target  # it resumed from a checkpoint at or after the chosen one
    a, b = _averages(whole / "final"), _averages(broken / "final")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert polyak.io.load(broken / "final")["step"] == STEPS
