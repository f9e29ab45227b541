"""Two averages in one foreach update against two one-slot updates, per workload (issue 14).

Run from the repository root (``PYTHONPATH=src`` unless polyak is installed):

    PYTHONPATH=src python bench/slots_speed.py                         # all CPU workloads
    PYTHONPATH=src python bench/slots_speed.py --workloads resnet50 --chunks 262144 1048576 4194304
    PYTHONPATH=src python bench/slots_speed.py --threads 1 --rounds 60

Kernel level first: for each workload of ``bench/update_speed.py`` (its CPU scale), the
averaged tensors of the model (its floating parameters, and floating buffers where the workload
tracks them) at the workload's shadow dtype, and these implementations:

- ``separate``: two one-slot ``foreach`` updates of two shadow sets (two EMAs of the model);
- ``two_slots``: one ``foreach`` update with two slots (``lerp_([w, w])``), at the chunk size of
  ``polyak._kernels._foreach.CHUNK_ELEMENTS`` (``two_slots@<n>``: with ``n`` elements per chunk);
- ``two_slots_stacked``: the same with each source's two shadows rows of one ``(2, *shape)``
  tensor (``stacked_rows``: one lerp per tensor for both slots);
- ``one_slot``: one one-slot update (half of ``separate``; the floor ``two_slots`` approaches is
  20/24 of ``separate`` for fp32: a source read once instead of twice).

Then the same through ``polyak.EMA`` (``update()``, kernel ``foreach``, the workload's buffer and
shadow-dtype policy, decays 0.999 and 0.9999), each ratio to ``ema_separate``:

- ``ema_separate``: two ``polyak.EMA`` objects, one per decay (what every peer offers);
- ``ema_two_slots``: one ``polyak.EMA(model, rule=averagers.Exponentials((0.999, 0.9999)))``.

Timing as in ``update_speed.py``: round-robin, order shuffled each round (seeded), warm-up
excluded; each ratio to ``separate`` is paired round by round, with a 95% bootstrap interval.
Other processes' CPU use is recorded (``LoadMonitor``); above the threshold the run is marked
loaded. Results: ``bench/results/slots_speed_cpu_<date>.json`` and a table on stdout.
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
from polyak import _kernels, averagers
from polyak._kernels import _foreach

DEFAULT_WORKLOADS = [
    "resnet50",
    "resnet50_buffers",
    "transformer",
    "bf16",
    "bf16_native",
    "vit_b16",
    "many_tiny",
]
WEIGHT = 1e-3


DECAYS = (0.999, 0.9999)


def tracked(workload: Any) -> list[torch.Tensor]:
    """The workload's averaged tensors."""
    tensors = [p.detach() for p in workload.model.parameters() if p.is_floating_point()]
    if workload.buffers:
        tensors += [b for b in workload.model.buffers() if b.is_floating_point()]
    return tensors


def ema_implementations(workload: Any, kernels: list[str]) -> dict[str, Any]:
    """Two EMAs against one EMA with two slots, through ``polyak.EMA.update()``, per kernel
    (``foreach`` rows unsuffixed, others as ``ema_separate[fused]``, ``ema_two_slots[fused]``)."""
    impls: dict[str, Any] = {}
    for kernel in kernels:
        settings = {
            "buffers": "average" if workload.buffers else "none",
            "shadow_dtype": workload.shadow_dtype,
            "kernel": kernel,
        }
        separate = [polyak.EMA(workload.model, d, **settings) for d in DECAYS]
        both = polyak.EMA(workload.model, rule=averagers.Exponentials(DECAYS), **settings)
        suffix = "" if kernel == "foreach" else f"[{kernel}]"
        impls[f"ema_separate{suffix}"] = lambda separate=separate: [e.update() for e in separate]
        impls[f"ema_two_slots{suffix}"] = both.update
    return impls


def _baseline(label: str) -> str:
    """What a row is compared with: ``separate``, or ``ema_separate`` of the same kernel."""
    if not label.startswith("ema_"):
        return "separate"
    return "ema_separate" + (label[label.index("[") :] if "[" in label else "")


def implementations(
    sources: list[torch.Tensor], dtype: torch.dtype, chunks: list[int]
) -> dict[str, Any]:
    def shadows() -> list[torch.Tensor]:
        return [s.to(dtype, copy=True) for s in sources]

    first, second = (_kernels.build("foreach", shadows(), sources) for _ in range(2))
    impls: dict[str, Any] = {
        "separate": lambda: (first.lerp_(WEIGHT), second.lerp_(WEIGHT)),
        "one_slot": lambda: first.lerp_(WEIGHT),
    }
    default = _foreach.CHUNK_ELEMENTS["cpu"]
    for chunk in [default, *[c for c in chunks if c != default]]:
        _foreach.CHUNK_ELEMENTS["cpu"] = chunk
        both = _kernels.build("foreach", [shadows(), shadows()], sources)
        label = "two_slots" if chunk == default else f"two_slots@{chunk}"
        impls[label] = lambda both=both: both.lerp_([WEIGHT, WEIGHT])
        rows = [torch.stack([s, s]).to(dtype) for s in sources]
        stacked = _kernels.build("foreach", [[r[0] for r in rows], [r[1] for r in rows]], sources)
        label = "two_slots_stacked" + ("" if chunk == default else f"@{chunk}")
        impls[label] = lambda stacked=stacked: stacked.lerp_([WEIGHT, WEIGHT])
    _foreach.CHUNK_ELEMENTS["cpu"] = default
    return impls


def run(
    name: str, rounds: int, warmup: int, chunks: list[int], seed: int, kernels: list[str]
) -> dict[str, Any]:
    workload = WORKLOADS[name]("cpu")
    sources, dtype, arch = tracked(workload), workload.shadow_dtype, workload.arch
    impls = implementations(sources, dtype, chunks) | ema_implementations(workload, kernels)
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
                times[label].append(time_calls(impls[label], "cpu"))
    foreign = monitor.stop()
    rows = []
    for label, samples in times.items():
        med, iqr = median_iqr(samples)
        baseline = _baseline(label)
        ratio, lo, hi = paired_ratio(samples, times[baseline])
        rows.append(
            {
                "impl": label,
                "median_ms": med,
                "iqr_ms": iqr,
                "baseline": baseline,
                "ratio": ratio,
                "ci": [lo, hi],
            }
        )
    return {
        "workload": name,
        "arch": arch,
        "tensors": len(sources),
        "elements": sum(s.numel() for s in sources),
        "source_dtypes": sorted({str(s.dtype) for s in sources}),
        "shadow_dtype": str(dtype),
        "foreign_cores": foreign,
        "rows": rows,
        "times_ms": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS)
    parser.add_argument("--chunks", nargs="*", type=int, default=[], help="extra chunk sizes")
    parser.add_argument(
        "--ema-kernels",
        nargs="+",
        default=["foreach"],
        help="kernels of the EMA-level rows (e.g. foreach fused: fused compiles first)",
    )
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [
        run(w, args.rounds, args.warmup, args.chunks, args.seed, args.ema_kernels)
        for w in args.workloads
    ]
    loaded, why = load_verdict([r["foreign_cores"] for r in results], load_threshold(None))
    report = {
        "benchmark": "slots_speed",
        "when": utc_now().isoformat(),
        "machine": machine_info("cpu"),
        "commit": git_commit(),
        "threads": torch.get_num_threads(),
        "chunk_elements": _foreach.CHUNK_ELEMENTS["cpu"],
        "rounds": args.rounds,
        "ema_kernels": args.ema_kernels,
        "loaded": loaded,
        "load": why,
        "workloads": results,
    }
    table = [
        {
            "workload": r["workload"],
            "impl": row["impl"],
            "ms": f"{row['median_ms']:.2f}",
            "ratio": f"{row['ratio']:.3f} [{row['ci'][0]:.3f}, {row['ci'][1]:.3f}]",
            "baseline": row["baseline"],
            "load": f"{r['foreign_cores']:.2f}" if r["foreign_cores"] is not None else "?",
        }
        for r in results
        for row in r["rows"]
    ]
    columns = [
        ("workload", "workload"),
        ("impl", "impl"),
        ("ms", "median ms"),
        ("ratio", "ratio [95%]"),
        ("baseline", "to"),
        ("load", "other busy cores"),
    ]
    print(markdown_table(table, columns, fmt=str))
    print(why)
    out = args.out or RESULTS_DIR / f"slots_speed_cpu_{utc_now():%Y-%m-%d}.json"
    write_json_atomic(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
