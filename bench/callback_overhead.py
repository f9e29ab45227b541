"""Per-step overhead of polyak's Lightning EMACallback against Lightning's own EMAWeightAveraging.

Run from the repository root (``PYTHONPATH=src`` unless polyak is installed; needs ``lightning``):

    PYTHONPATH=src python bench/callback_overhead.py                    # defaults below
    PYTHONPATH=src python bench/callback_overhead.py --rounds 20 --threads 1
    PYTHONPATH=src python bench/callback_overhead.py --rounds 2 --steps 10 --warmup 3   # a trial

The workload: an MLP (``--width``, ``--depth``; 4 x 1024 by default, 3.1M fp32 parameters) trained
with Adam on random data on the CPU, batch 64, ``Trainer(accelerator="cpu", devices=1)``, no
validation, no logging. Variants, each a separate ``trainer.fit`` of ``warmup + steps`` steps:

- ``none``: no callback (the baseline);
- ``polyak``: ``EMACallback(0.999)`` (the update runs in an optimizer post-step hook);
- ``lightning``: ``EMAWeightAveraging(decay=0.999)`` (an ``AveragedModel`` updated in
  ``on_train_batch_end``).

A timing callback (first in the list) stamps ``perf_counter_ns`` at each ``on_train_batch_start``;
the time per step of a fit is the time from the start of step ``warmup`` to the start of its last
step divided by the steps between, so the update of every measured step is inside the window and
``fit``'s setup is not. Rounds are round-robin with the order shuffled each round (seeded); per
round, the overhead of a callback is its time per step minus the baseline's of the same round, and
its ratio to the baseline is paired the same way (median over rounds with a 95% bootstrap interval,
``_common.paired_ratio``). For context, the update alone is timed too (``update_only``): one
``polyak.EMA.update()`` and one ``AveragedModel.update_parameters`` on the same model.

Other processes' CPU use is recorded (``LoadMonitor``); above the threshold the run is marked
loaded. Results: ``bench/results/callback_overhead_cpu_<date>.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import random
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
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
    package_versions,
    paired_ratio,
    time_calls,
    utc_now,
    write_json_atomic,
)
from torch import nn

import polyak

DECAY = 0.999
VARIANTS = ("none", "polyak", "lightning")


def build_model(width: int, depth: int) -> nn.Module:
    import lightning.pytorch as pl

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            layers: list[nn.Module] = []
            for _ in range(depth):
                layers += [nn.Linear(width, width), nn.ReLU()]
            self.body = nn.Sequential(*layers[:-1])

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.body(x).square().mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    return MLP()


class StepClock:
    """Stamps the start of every training batch; ``per_step_ms`` over the measured window."""

    def __init__(self, warmup: int) -> None:
        from lightning.pytorch.callbacks import Callback

        clock = self

        class _Clock(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                clock.stamps.append(time.perf_counter_ns())

        self.callback = _Clock()
        self.warmup = warmup
        self.stamps: list[int] = []

    def per_step_ms(self) -> float:
        window = self.stamps[self.warmup :]
        return (window[-1] - window[0]) / 1e6 / (len(window) - 1)


def callbacks_for(variant: str) -> list[Any]:
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from polyak.integrations.lightning import EMACallback

    if variant == "polyak":
        return [EMACallback(DECAY)]
    if variant == "lightning":
        return [EMAWeightAveraging(decay=DECAY)]
    return []


def fit_once(variant: str, width: int, depth: int, batch: int, warmup: int, steps: int) -> float:
    """Milliseconds per training step of one fit of ``variant``."""
    import lightning.pytorch as pl

    clock = StepClock(warmup)
    data = torch.utils.data.TensorDataset(torch.randn(batch * (warmup + steps + 1), width))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + steps + 1,  # + 1: the last measured step ends at the next start
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[clock.callback, *callbacks_for(variant)],
    )
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as in time_calls: no collection inside the measured window
    try:
        trainer.fit(build_model(width, depth), torch.utils.data.DataLoader(data, batch_size=batch))
    finally:
        if gc_was_enabled:
            gc.enable()
    return clock.per_step_ms()


def update_only(width: int, depth: int, reps: int) -> dict[str, float]:
    """Median milliseconds of one update of each EMA, outside Lightning, on the same model."""
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn

    model = build_model(width, depth)
    ema = polyak.EMA(model, DECAY)
    averaged = AveragedModel(model, avg_fn=get_ema_avg_fn(DECAY), use_buffers=True)
    averaged.update_parameters(model)  # its first update copies
    fns = {"polyak": ema.update, "lightning": lambda: averaged.update_parameters(model)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(reps):
            for key, fn in fns.items():
                times[key].append(time_calls(fn, "cpu"))
    return {k: statistics.median(v) for k, v in times.items()}


def paired_difference(a: list[float], b: list[float], seed: int = 0) -> tuple[float, float, float]:
    """Median over rounds of ``a[r] - b[r]`` and a 95% bootstrap interval (rounds resampled)."""
    diffs = np.asarray(a) - np.asarray(b)
    if len(diffs) < 4:
        med = float(np.median(diffs))
        return med, med, med
    picks = np.random.default_rng(seed).integers(0, len(diffs), (4000, len(diffs)))
    medians = np.median(diffs[picks], axis=1)
    lo, hi = np.quantile(medians, [0.025, 0.975])
    return float(np.median(diffs)), float(lo), float(hi)


def run(
    rounds: int, warmup: int, steps: int, width: int, depth: int, batch: int, seed: int
) -> dict[str, Any]:
    """The round-robin; returns the report without machine data (``main`` adds it)."""
    rng = random.Random(seed)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    monitor = LoadMonitor().start()
    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), quiet[0], quiet[1]:
        warnings.simplefilter("ignore")
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        for variant in VARIANTS:  # one unmeasured fit each: imports, first-call costs
            fit_once(variant, width, depth, batch, 1, 2)
        for _ in range(rounds):
            order = list(VARIANTS)
            rng.shuffle(order)
            for variant in order:
                times[variant].append(fit_once(variant, width, depth, batch, warmup, steps))
    foreign = monitor.stop()
    rows = []
    for variant, samples in times.items():
        med, iqr = median_iqr(samples)
        ratio, lo, hi = paired_ratio(samples, times["none"])
        over, over_lo, over_hi = paired_difference(samples, times["none"], seed)
        rows.append(
            {
                "variant": variant,
                "median_ms_per_step": med,
                "iqr_ms": iqr,
                "ratio_to_none": ratio,
                "ratio_ci": [lo, hi],
                "overhead_ms": over,
                "overhead_ci": [over_lo, over_hi],
            }
        )
    return {
        "rows": rows,
        "times_ms": times,
        "update_only_ms": update_only(width, depth, reps=max(10, rounds)),
        "foreign_cores": foreign,
        "parameters": sum(p.numel() for p in build_model(width, depth).parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(
        args.rounds, args.warmup, args.steps, args.width, args.depth, args.batch, args.seed
    )
    loaded, why = load_verdict([result["foreign_cores"]], load_threshold(None))
    report = {
        "benchmark": "callback_overhead",
        "when": utc_now().isoformat(),
        "machine": machine_info("cpu"),
        "commit": git_commit(),
        "versions": package_versions(["torch", "lightning", "numpy"]),
        "threads": torch.get_num_threads(),
        "settings": {
            "rounds": args.rounds,
            "warmup": args.warmup,
            "steps": args.steps,
            "width": args.width,
            "depth": args.depth,
            "batch": args.batch,
            "decay": DECAY,
            "optimizer": "Adam",
            "dtype": "float32",
            "seed": args.seed,
        },
        "loaded": loaded,
        "load": why,
        **result,
    }
    table = [
        {
            "variant": row["variant"],
            "ms": f"{row['median_ms_per_step']:.2f} ± {row['iqr_ms']:.2f}",
            "overhead": f"{row['overhead_ms']:+.2f} [{row['overhead_ci'][0]:+.2f}, "
            f"{row['overhead_ci'][1]:+.2f}]",
            "ratio": f"{row['ratio_to_none']:.3f} [{row['ratio_ci'][0]:.3f}, "
            f"{row['ratio_ci'][1]:.3f}]",
        }
        for row in result["rows"]
    ]
    columns = [
        ("variant", "callback"),
        ("ms", "ms/step (median ± IQR)"),
        ("overhead", "overhead ms [95%]"),
        ("ratio", "to none [95%]"),
    ]
    print(markdown_table(table, columns, fmt=str))
    print("update alone (ms):", {k: round(v, 3) for k, v in result["update_only_ms"].items()})
    print(why)
    out = args.out or RESULTS_DIR / f"callback_overhead_cpu_{utc_now():%Y-%m-%d}.json"
    write_json_atomic(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
