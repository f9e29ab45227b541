"""What ``nonfinite=`` costs per ``ema.update()``: "detect" (the default), "raise" and "skip" against "ignore".

Run from the repository root (``PYTHONPATH=src`` unless polyak is installed):

    PYTHONPATH=src python bench/nonfinite_cost.py                          # all CPU workloads
    PYTHONPATH=src python bench/nonfinite_cost.py --workloads resnet50 many_tiny --rounds 20
    PYTHONPATH=src python bench/nonfinite_cost.py --device cuda            # on a GPU

For each workload of ``bench/update_speed.py`` (its CPU scale on the CPU), three
``polyak.EMA(model, decay=0.999, kernel=<auto>, nonfinite=...)`` of the same model, with the
workload's buffer and shadow-dtype policy:

- ``ignore``: no check (the update of polyak before ``nonfinite`` existed);
- ``detect`` (the default): no check per update either (the shadows are checked where they are
  read), so its ratio to ``ignore`` is the run's noise;
- ``raise`` and ``skip``: the check before every averaging update (``polyak._finite``): on the
  CPU the 2-norm of every tracked tensor (``torch._foreach_norm``) read on the host, on CUDA the
  max-norm reduced to a device flag that gates the kernel; the weights are all finite here, so
  this is the cost a run pays when nothing is wrong;
- ``check_only``: that check alone (``ema._finite.gate(step)``), without the update.

Timing as in ``update_speed.py`` and ``slots_speed.py``: round-robin, order shuffled each round
(seeded), warm-up excluded; every ratio to ``ignore`` is paired round by round, with a 95%
bootstrap interval. Other processes' CPU use is recorded (``LoadMonitor``); above the threshold
the run is marked loaded. Results: ``bench/results/nonfinite_cost_<device>_<date>.json`` and a
table on stdout.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import torch
from _common import (
    RESULTS_DIR,
    LoadMonitor,
    git_commit,
    load_threshold,
    load_verdict,
    machine_info,
    markdown_table,
    median_iqr,
    paired_ratio,
    time_calls,
    utc_now,
    write_json_atomic,
)
from update_speed import WORKLOADS

import polyak

DEFAULT_WORKLOADS = [
    "resnet50",
    "resnet50_buffers",
    "transformer",
    "bf16",
    "vit_b16",
    "many_tiny",
]
POLICIES = ("ignore", "detect", "raise", "skip")


def run(name: str, device: str, rounds: int, warmup: int, seed: int) -> dict[str, Any]:
    workload = WORKLOADS[name](device)
    settings = {
        "decay": 0.999,
        "buffers": "average" if workload.buffers else "none",
        "shadow_dtype": workload.shadow_dtype,
    }
    emas = {policy: polyak.EMA(workload.model, nonfinite=policy, **settings) for policy in POLICIES}
    checked = emas["raise"]
    impls = {policy: ema.update for policy, ema in emas.items()}
    impls["check_only"] = lambda: checked._finite.gate(1)
    times: dict[str, list[float]] = {k: [] for k in impls}
    rng = random.Random(seed)
    monitor = LoadMonitor().start()
    with torch.no_grad():
        for fn in impls.values():
            for _ in range(warmup):
                fn()
        for _ in range(rounds):
            order = list(impls)
            rng.shuffle(order)
            for label in order:
                times[label].append(time_calls(impls[label], device))
    foreign = monitor.stop()
    assert all(ema.skipped_steps == 0 for ema in emas.values())  # finite weights: nothing skipped
    rows = []
    for label, samples in times.items():
        med, iqr = median_iqr(samples)
        ratio, lo, hi = paired_ratio(samples, times["ignore"])
        rows.append(
            {"impl": label, "median_ms": med, "iqr_ms": iqr, "ratio": ratio, "ci": [lo, hi]}
        )
    tracked = [t for t in checked._finite.sources]
    return {
        "workload": name,
        "arch": workload.arch,
        "kernel": checked.kernel,
        "check_mode": "host" if checked._finite.host else "device",
        "tensors": len(tracked),
        "elements": sum(t.numel() for t in tracked),
        "dtypes": sorted({str(t.dtype) for t in tracked}),
        "shadow_dtype": str(workload.shadow_dtype),
        "foreign_cores": foreign,
        "rows": rows,
        "times_ms": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [run(w, args.device, args.rounds, args.warmup, args.seed) for w in args.workloads]
    loaded, why = load_verdict([r["foreign_cores"] for r in results], load_threshold(None))
    report = {
        "benchmark": "nonfinite_cost",
        "when": utc_now().isoformat(),
        "machine": machine_info(args.device),
        "commit": git_commit(),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "loaded": loaded,
        "load": why,
        "workloads": results,
    }
    table = [
        {
            "workload": f"{r['workload']} ({r['tensors']} tensors, {r['kernel']}, {r['check_mode']})",
            "impl": row["impl"],
            "ms": f"{row['median_ms']:.3f}",
            "ratio": f"{row['ratio']:.3f} [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}]",
            "load": f"{r['foreign_cores']:.2f}" if r["foreign_cores"] is not None else "?",
        }
        for r in results
        for row in r["rows"]
    ]
    columns = [
        ("workload", "workload"),
        ("impl", "nonfinite="),
        ("ms", "median ms"),
        ("ratio", "to ignore [95%]"),
        ("load", "other busy cores"),
    ]
    print(markdown_table(table, columns, fmt=str))
    print(why)
    out = args.out or RESULTS_DIR / f"nonfinite_cost_{args.device}_{utc_now():%Y-%m-%d}.json"
    write_json_atomic(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
