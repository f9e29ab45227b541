"""A process that has imported torch and polyak and forks savers to be killed (for
tests/test_io_faults.py).

Started once per test module (``python tests/_crash_server.py``); it reads one JSON command per
line on stdin and answers one JSON line on stdout. Forking from here makes a trial cost a fork
(milliseconds) instead of a Python start with torch (seconds):

- ``{"op": "calibrate", "kind": ..., "dir": ...}``: save a few times in-process; answers the mean
  seconds per save, so the test can aim its kills across whole saves.
- ``{"op": "trial", "kind": ..., "dir": ..., "after": n, "delay": s}``: fork a child that builds
  the run (:func:`run`), then saves version 1, 2, 3, ... of it to ``<dir>/out`` in a loop, writing
  each version's number to a pipe once its save returned; ``delay`` seconds after the child
  reported its ``n``-th save (after the fork, for 0) it gets SIGKILL. Answers ``{"done": n, "signal": ...}``: the last version whose save returned
  (0: none) and the signal that ended the child (9 unless it died on its own: a bug).

``kind``: ``"state"`` (``ema.save_state``) or ``"export"`` (``ema.save``). :func:`run` and
:func:`advance` are imported by the test too, which rebuilds version ``n`` to compare.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch

import polyak


def run() -> tuple[torch.nn.Module, polyak.EMA]:
    """The run every trial saves: a model of ~1 MB and its EMA at version 0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
    model.register_buffer("count", torch.zeros((), dtype=torch.int64))  # copied, not averaged
    return model, polyak.EMA(model, decay=0.75)


def advance(model: torch.nn.Module, ema: polyak.EMA) -> None:
    """One version on: the weights move (exactly: adding 1/8), and the EMA averages them."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.125)
        model.count.add_(1)
    ema.update()


def save(kind: str, ema: polyak.EMA, path: str) -> None:
    if kind == "state":
        ema.save_state(path)
    else:
        ema.save(path)


def child(kind: str, path: str, report: int) -> None:
    model, ema = run()
    version = 0
    while True:
        version += 1
        advance(model, ema)
        save(kind, ema, path)
        os.write(report, version.to_bytes(8, "little"))


def trial(kind: str, directory: str, after: int, delay: float) -> dict[str, int]:
    path = os.path.join(directory, "out")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read)
        try:
            child(kind, path, write)
        except BaseException as error:
            sys.stderr.write(f"saver failed: {error!r}\n")
        os._exit(3)
    os.close(write)
    data = b""
    while len(data) < 8 * after:  # wait for `after` saves to complete ...
        chunk = os.read(read, 8 * after - len(data))
        if not chunk:
            break
        data += chunk
    time.sleep(delay)  # ... then kill somewhere in the next one
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    while chunk := os.read(read, 1 << 16):
        data += chunk
    os.close(read)
    done = int.from_bytes(data[-8:], "little") if len(data) >= 8 else 0
    return {"done": done, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1}


def calibrate(kind: str, directory: str) -> dict[str, float]:
    model, ema = run()
    path = os.path.join(directory, "calibrate")
    start = time.perf_counter()
    for _ in range(5):
        advance(model, ema)
        save(kind, ema, path)
    return {"seconds": (time.perf_counter() - start) / 5}


def main() -> None:
    torch.set_num_threads(1)  # no thread pool exists when the server forks
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "trial":
            answer = trial(command["kind"], command["dir"], command["after"], command["delay"])
        else:
            answer = calibrate(command["kind"], command["dir"])
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
