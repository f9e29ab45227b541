"""Wall time and final accuracies of the default ``polyak demo``, with the commit it ran on.

Runs ``python -m polyak demo`` exactly as a user would (no options but ``--out``, ``--no-progress``
and, when given, ``--threads``) in a subprocess, timing the whole process: interpreter start,
imports, data loading, training, evaluation and the plot. Writes
``bench/results/demo_time_<YYYY-MM-DD>_threads<N>.json`` and prints a markdown table. The record
holds:

- ``git``: the commit, and whether the working tree was dirty (``git status --porcelain``, the
  benchmark's own untracked results under ``bench/results/`` aside) with the dirty entries; numbers
  for the README must come from a clean tree;
- ``threads``: torch's CPU thread count during the run (the demo's numbers are reproducible for a
  given seed and thread count, and change with it);
- per repetition: wall and training seconds, every seed's final raw and EMA test accuracy, their
  mean and sample standard deviation, and the mean EMA - raw margin;
- the machine, versions, the demo's resolved configuration, and the load average before and after
  (a shared or busy machine inflates the wall times, not the accuracies).

Run from the repository root:

    PYTHONPATH=src python bench/demo_time.py --threads 1
    PYTHONPATH=src python bench/demo_time.py --threads 2 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    RESULTS_DIR,
    git_commit,
    machine_info,
    markdown_table,
    utc_now,
    write_json_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
_CONFIG_KEYS = (
    "dataset",
    "width",
    "epochs",
    "total_steps",
    "batch_size",
    "lr",
    "lr_schedule",
    "momentum",
    "weight_decay",
    "decay",
    "schedule",
    "warmup",
    "bn",
    "seeds",
    "seed",
)


def git_state(root: Path = ROOT) -> dict[str, Any]:
    """``HEAD`` and whether the tree differs from it (``_common.git_commit``: files under
    ``bench/results/`` are benchmark outputs and do not count). ``dirty`` is ``None`` when git
    cannot tell (no checkout)."""
    state = git_commit(root)
    return {
        "commit": state["commit"],
        "dirty": state["tree_dirty"],
        "dirty_entries": state["dirty_files"],
    }


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, help="pass --threads N to the demo (default: torch's setting)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="independent runs of the demo")
    parser.add_argument(
        "--out",
        type=Path,
        help="result file (default: results/demo_time_<date>_threads<N>.json)",
    )
    args = parser.parse_args()

    git = git_state()
    if git["dirty"]:
        print(
            "warning: the working tree is dirty; the record says so, and README numbers need a "
            "clean commit:\n  " + "\n  ".join(git["dirty_entries"]),
            file=sys.stderr,
        )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    load_before = os.getloadavg()
    rows = []
    for rep in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, "-m", "polyak", "demo", "--out", tmp, "--no-progress"]
            if args.threads is not None:
                command += ["--threads", str(args.threads)]
            tic = time.perf_counter()
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - tic
            if result.returncode != 0:
                sys.exit(f"the demo failed ({result.returncode}):\n{result.stderr}")
            metrics = json.loads((Path(tmp) / "metrics.json").read_text())
        raw = [run["final"]["raw_acc"] for run in metrics["runs"]]
        ema = [run["final"]["ema_acc"] for run in metrics["runs"]]
        rows.append(
            {
                "repeat": rep,
                "wall_s": round(wall, 2),
                "train_s": round(sum(run["train_s"] for run in metrics["runs"]), 2),
                "seeds": [run["seed"] for run in metrics["runs"]],
                "raw_acc": raw,
                "ema_acc": ema,
                "raw_acc_mean": float(np.mean(raw)),
                "raw_acc_std": _std(raw),
                "ema_acc_mean": float(np.mean(ema)),
                "ema_acc_std": _std(ema),
                "margin_mean": float(np.mean(ema) - np.mean(raw)),
            }
        )
        print(result.stdout, end="", flush=True)

    threads = metrics["environment"]["torch_threads"]
    config = metrics["config"]
    record = {
        "benchmark": "demo_time",
        "command": "python -m polyak demo" + (f" --threads {args.threads}" if args.threads else ""),
        "date": utc_now().isoformat(timespec="seconds"),
        "git": git,
        "threads": threads,
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "machine": machine_info("cpu") | {"torch_threads": threads},
        "versions": {"torch": torch.__version__, "polyak": metrics["environment"]["polyak"]},
        "demo_config": {key: config[key] for key in _CONFIG_KEYS},
        "std": "sample (ddof=1) over the seeds of one run",
        "rows": rows,
    }
    date = utc_now()
    out = args.out or RESULTS_DIR / f"demo_time_{date:%Y-%m-%d}_threads{threads}.json"
    write_json_atomic(out, record)
    print()
    state = "dirty tree" if git["dirty"] else "clean tree"
    print(
        f"default `polyak demo` on {record['machine']['cpu_model']} ({threads} torch threads), "
        f"torch {torch.__version__}, commit {(git['commit'] or '?')[:10]} ({state}):"
    )
    table = [
        row
        | {
            "raw": f"{100 * row['raw_acc_mean']:.2f} ± {100 * row['raw_acc_std']:.2f}%",
            "ema": f"{100 * row['ema_acc_mean']:.2f} ± {100 * row['ema_acc_std']:.2f}%",
            "margin": f"{100 * row['margin_mean']:.2f} points",
        }
        for row in rows
    ]
    print(
        markdown_table(
            table,
            [
                ("repeat", "run"),
                ("wall_s", "wall (s)"),
                ("train_s", "training (s)"),
                ("raw", "raw acc"),
                ("ema", "EMA acc"),
                ("margin", "EMA - raw"),
            ],
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
