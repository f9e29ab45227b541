"""Post-hoc EMA on the digits demo: the EMA length chosen on validation after training, against
fixed decays chosen before it.

Run from the repository root (CPU; about 2 minutes for 5 seeds on one idle core):

    PYTHONPATH=src python bench/posthoc_sweep.py [--seeds 5] [--threads 1] [--epochs 15]

Each seed is one ``polyak demo --posthoc`` run with the digits defaults (SeedCNN width 32, 15
epochs of batch 64, SGD lr 0.5 with weight decay 5e-3, BatchNorm statistics recomputed for every
average), with 0.2 of the training images held out for validation (1,078 train / 269
validation / 450 test). Beside the PowerEMA (sigma_rel 0.05 and 0.10, one EMA with two slots,
snapshots every total/32 steps) the same run tracks the fixed-decay EMAs, one slot each of one
more EMA (``--compare``): ``tf_warmup(d)``, the demo's form, min(d, (1+n)/(10+n)), and
``constant(d)``, for d in 0.99, 0.999, 0.9999. Then ``polyak posthoc --eval`` rebuilds sigma_rel
0.02, 0.04, ..., 0.28 from the snapshots and scores each on validation and test exactly as the
fixed EMAs are scored (BatchNorm recomputed on the same batches under the same seed).

Compared on the test split, per seed and as mean ± sample std over seeds:

- post-hoc: the sigma_rel with the best validation accuracy (ties: lower validation loss);
- fixed, chosen on validation: the fixed-decay EMA with the best validation accuracy, the same
  rule (the fair comparison: both choose with the same data);
- fixed, best on test: the one fixed EMA with the best mean test accuracy over the seeds (an
  oracle, chosen with the test labels: an upper bound for any choice of a fixed decay);
- post-hoc, best on test: the sigma_rel with the best test accuracy per seed (its oracle);
- both chosen on the validation loss alone (a smoother criterion than 269 images' accuracy).

Writes ``bench/results/posthoc_sweep_digits_cpu_<date>.json`` and ``.png`` (never over an
existing file: pass ``--out`` for another name). Snapshots go to a temporary directory, deleted
at the end (``--keep DIR`` keeps them there).
"""

from __future__ import annotations

import argparse
import io
import shutil
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
    package_versions,
    utc_now,
    write_json_atomic,
)

import polyak
from polyak.demo.sweep import sigma_rel_grid, sweep
from polyak.demo.train import DemoConfig, run_demo

DECAYS = (0.99, 0.999, 0.9999)
FORMS = ("tf_warmup", "constant")
SIGMA_RELS = sigma_rel_grid(0.02, 0.28, 14)


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
        "min": float(np.min(values)),
        "max": float(np.max(values)),
        "n": len(values),
    }


def _rank(scores: dict[str, float]) -> tuple[float, float]:
    return -scores["val_acc"], scores["val_loss"]


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    specs = [f"{form}:decay={d}" for form in FORMS for d in DECAYS]
    config = DemoConfig(
        seed=args.seed,
        seeds=args.seeds,
        epochs=args.epochs,
        threads=args.threads,
        posthoc=True,
        compare=tuple(specs),
        out=str(work),
        progress=False,
        plot=False,
    )
    table = io.StringIO()
    tic = time.perf_counter()
    metrics = run_demo(config, stream=table)
    train_s = time.perf_counter() - tic
    print(table.getvalue(), end="")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    tic = time.perf_counter()
    try:
        sweeps = [
            sweep(work / entry["posthoc"]["dir"], SIGMA_RELS, evaluate=True)
            for entry in metrics["runs"]
        ]
    finally:
        torch.set_num_threads(threads)
    sweep_s = time.perf_counter() - tic

    per_seed = []
    for entry, result in zip(metrics["runs"], sweeps, strict=True):
        fixed = entry["final"]["compare"]
        chosen_fixed = min(specs, key=lambda s: _rank(fixed[s]))
        best = result.rows[result.best]
        oracle = max(result.rows, key=lambda r: r["test_acc"])
        by_loss = min(result.rows, key=lambda r: r["val_loss"])
        fixed_by_loss = min(specs, key=lambda s: fixed[s]["val_loss"])
        per_seed.append(
            {
                "seed": entry["seed"],
                "posthoc_chosen_on_val": {
                    k: best[k] for k in ("sigma_rel", "val_acc", "val_loss", "test_acc")
                },
                "posthoc_best_on_test": {k: oracle[k] for k in ("sigma_rel", "test_acc")},
                "posthoc_chosen_on_val_loss": {k: by_loss[k] for k in ("sigma_rel", "test_acc")},
                "fixed": fixed,
                "fixed_chosen_on_val": {"schedule": chosen_fixed, **fixed[chosen_fixed]},
                "fixed_chosen_on_val_loss": {"schedule": fixed_by_loss, **fixed[fixed_by_loss]},
                "demo_ema_test_acc": entry["final"]["ema_acc"],
                "raw_test_acc": entry["final"]["raw_acc"],
                "sweep": result.rows,
            }
        )

    def column(path: tuple[str, ...]) -> list[float]:
        out = []
        for seed in per_seed:
            value: Any = seed
            for key in path:
                value = value[key]
            out.append(value)
        return out

    fixed_test = {s: _stats(column(("fixed", s, "test_acc"))) for s in specs}
    best_fixed = max(specs, key=lambda s: fixed_test[s]["mean"])
    posthoc_test = column(("posthoc_chosen_on_val", "test_acc"))
    chosen_fixed_test = column(("fixed_chosen_on_val", "test_acc"))
    best_fixed_test = column(("fixed", best_fixed, "test_acc"))

    def paired(a: list[float], b: list[float]) -> dict[str, Any]:
        diff = [x - y for x, y in zip(a, b, strict=True)]
        return _stats(diff) | {
            "wins": sum(d > 0 for d in diff),
            "ties": sum(d == 0 for d in diff),
            "losses": sum(d < 0 for d in diff),
        }

    identical = {
        form: all(
            len({seed["fixed"][f"{form}:decay={d}"]["test_acc"] for d in DECAYS}) == 1
            and len({seed["fixed"][f"{form}:decay={d}"]["val_loss"] for d in DECAYS}) == 1
            for seed in per_seed
        )
        for form in FORMS
    }
    summary = {
        "posthoc_chosen_on_val": {
            "test_acc": _stats(posthoc_test),
            "sigma_rels": column(("posthoc_chosen_on_val", "sigma_rel")),
        },
        "posthoc_best_on_test": {
            "test_acc": _stats(column(("posthoc_best_on_test", "test_acc"))),
            "sigma_rels": column(("posthoc_best_on_test", "sigma_rel")),
        },
        "posthoc_chosen_on_val_loss": {
            "test_acc": _stats(column(("posthoc_chosen_on_val_loss", "test_acc"))),
            "sigma_rels": column(("posthoc_chosen_on_val_loss", "sigma_rel")),
        },
        "fixed_chosen_on_val_loss": {
            "test_acc": _stats(column(("fixed_chosen_on_val_loss", "test_acc"))),
            "schedules": column(("fixed_chosen_on_val_loss", "schedule")),
        },
        "fixed_test_acc": fixed_test,
        "fixed_chosen_on_val": {
            "test_acc": _stats(chosen_fixed_test),
            "schedules": column(("fixed_chosen_on_val", "schedule")),
        },
        "fixed_best_on_test": {"schedule": best_fixed, "test_acc": fixed_test[best_fixed]},
        "posthoc_minus_fixed_chosen_on_val": paired(posthoc_test, chosen_fixed_test),
        "posthoc_minus_fixed_best_on_test": paired(posthoc_test, best_fixed_test),
        "posthoc_minus_fixed_both_chosen_on_val_loss": paired(
            column(("posthoc_chosen_on_val_loss", "test_acc")),
            column(("fixed_chosen_on_val_loss", "test_acc")),
        ),
        "demo_ema_test_acc": _stats(column(("demo_ema_test_acc",))),
        "raw_test_acc": _stats(column(("raw_test_acc",))),
        "sweep_mean": [
            {
                "sigma_rel": sigma,
                "val_acc": _stats([s["sweep"][i]["val_acc"] for s in per_seed]),
                "test_acc": _stats([s["sweep"][i]["test_acc"] for s in per_seed]),
            }
            for i, sigma in enumerate(SIGMA_RELS)
        ],
        "fixed_decays_identical_in_this_run": identical,
    }
    total = metrics["config"]["total_steps"]
    return {
        "benchmark": "posthoc_sweep",
        "date": utc_now().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine_info("cpu"),
        "versions": {"polyak": polyak.__version__}
        | package_versions(["torch", "numpy", "scikit-learn", "safetensors", "matplotlib"]),
        "settings": {
            "demo_config": metrics["config"],
            "sigma_rels": SIGMA_RELS,
            "fixed_schedules": specs,
            "selection": (
                "highest validation accuracy, then lowest validation loss (polyak posthoc's "
                "rule); *_chosen_on_val_loss: lowest validation loss alone"
            ),
            "std": "sample (ddof=1) over seeds",
            "note": (
                f"{total} optimizer steps: tf_warmup(d) is min(d, (1+n)/(10+n)), and "
                f"(1+n)/(10+n) < 0.99 for every n < 890, so tf_warmup(0.99), (0.999) and "
                f"(0.9999) are the same average in runs shorter than 890 steps. constant(0.999) "
                f"and constant(0.9999) keep {0.999**total:.0%} and {0.9999**total:.0%} of the "
                f"random initial weights after {total} steps."
            ),
        },
        "per_seed": per_seed,
        "summary": summary,
        "wall_s": {"train": train_s, "sweep": sweep_s},
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from polyak.io import atomic_path

    summary = result["summary"]
    fig = Figure(figsize=(11, 4.2), dpi=120)
    curve, seeds = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    sigma = [row["sigma_rel"] for row in summary["sweep_mean"]]
    for key, label, color in (("val_acc", "validation", "tab:orange"), ("test_acc", "test", "tab:blue")):  # fmt: skip
        mean = np.array([100 * row[key]["mean"] for row in summary["sweep_mean"]])
        std = np.array([100 * row[key]["std"] for row in summary["sweep_mean"]])
        curve.plot(sigma, mean, marker="o", markersize=3, color=color, label=f"post-hoc, {label}")
        curve.fill_between(sigma, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
    styles = {"tf_warmup": "--", "constant": ":"}
    colors = {"tf_warmup": "tab:green", "constant": "tab:red"}
    lines: dict[tuple[str, float], list[str]] = {}  # equal averages (tf_warmup) drawn once
    for spec, stats in summary["fixed_test_acc"].items():
        form, decay = spec.split(":decay=")
        lines.setdefault((form, stats["mean"]), []).append(decay)
    hidden = []
    for (form, mean), decays in lines.items():
        label = f"fixed {form}({' = '.join(decays)}), test"
        if mean < 0.5:  # near chance: off the scale
            hidden.append(f"{form}({', '.join(decays)}) {100 * mean:.0f}%")
            continue
        curve.axhline(
            100 * mean, color=colors[form], linestyle=styles[form], linewidth=1, label=label
        )
    if hidden:
        curve.text(
            0.02, 0.02, "off the scale: " + "; ".join(hidden), fontsize=7, transform=curve.transAxes
        )
    curve.set_xlabel("sigma_rel")
    curve.set_ylabel("accuracy (%), mean ± std over seeds")
    curve.grid(alpha=0.3)
    curve.legend(fontsize=7)
    n = len(result["per_seed"])
    curve.set_title(f"digits, {n} seeds: post-hoc EMA sweep vs fixed decays", fontsize=9)
    posthoc_test = [100 * s["posthoc_chosen_on_val"]["test_acc"] for s in result["per_seed"]]
    fixed_val = [100 * s["fixed_chosen_on_val"]["test_acc"] for s in result["per_seed"]]
    best = summary["fixed_best_on_test"]["schedule"]
    fixed_best = [100 * s["fixed"][best]["test_acc"] for s in result["per_seed"]]
    x = np.arange(n)
    for offset, values, label, marker in (
        (-0.2, posthoc_test, "post-hoc, sigma_rel chosen on val", "o"),
        (0.0, fixed_val, "fixed, chosen on val", "s"),
        (0.2, fixed_best, f"fixed, best on test ({best})", "^"),
    ):
        seeds.plot(x + offset, values, marker, label=label)
    seeds.set_xticks(x, [str(s["seed"]) for s in result["per_seed"]])
    seeds.set_xlabel("seed")
    seeds.set_ylabel("test accuracy (%)")
    seeds.grid(alpha=0.3)
    seeds.legend(fontsize=7)
    seeds.set_title("per seed, test split", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="runs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default: 0)")
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs per run (default: the demo's, 15)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--out", type=Path, help="result JSON (the PNG goes beside it)")
    parser.add_argument("--keep", type=Path, help="keep the run and its snapshots in this dir")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error(f"--seeds must be >= 2 for a spread, got {args.seeds}")
    out = args.out or RESULTS_DIR / f"posthoc_sweep_digits_cpu_{utc_now().date()}.json"
    if out.exists():
        parser.error(f"{out} exists; results are never overwritten: pass --out NEW.json")
    work = args.keep or Path(tempfile.mkdtemp(prefix="polyak-posthoc-bench-"))
    tic = time.perf_counter()
    try:
        result = run(args, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    result["wall_s"]["total"] = time.perf_counter() - tic
    write_json_atomic(out, result)
    plot(result, out.with_suffix(".png"))
    s = result["summary"]

    def pct(stats: dict[str, Any]) -> str:
        return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}%"

    print(f"\ntest accuracy over {len(result['per_seed'])} seeds (mean ± sample std):")
    print(
        f"  post-hoc, sigma_rel chosen on validation: {pct(s['posthoc_chosen_on_val']['test_acc'])}"
        f" (sigma_rel {s['posthoc_chosen_on_val']['sigma_rels']})"
    )
    print(
        f"  post-hoc, best on test (oracle):          {pct(s['posthoc_best_on_test']['test_acc'])}"
    )
    print(
        f"  post-hoc, chosen on validation loss:      "
        f"{pct(s['posthoc_chosen_on_val_loss']['test_acc'])}"
        f" (sigma_rel {s['posthoc_chosen_on_val_loss']['sigma_rels']})"
    )
    print(
        f"  fixed decay, chosen on validation:        {pct(s['fixed_chosen_on_val']['test_acc'])}"
        f" ({s['fixed_chosen_on_val']['schedules']})"
    )
    print(
        f"  fixed decay, best on test (oracle):       {pct(s['fixed_best_on_test']['test_acc'])}"
        f" ({s['fixed_best_on_test']['schedule']})"
    )
    for spec, stats in s["fixed_test_acc"].items():
        print(f"    {spec:<24} {pct(stats)}")
    for key in (
        "posthoc_minus_fixed_chosen_on_val",
        "posthoc_minus_fixed_best_on_test",
        "posthoc_minus_fixed_both_chosen_on_val_loss",
    ):
        d = s[key]
        print(
            f"  {key}: {100 * d['mean']:+.2f} ± {100 * d['std']:.2f} points "
            f"(wins/ties/losses {d['wins']}/{d['ties']}/{d['losses']})"
        )
    print(f"wrote {out} and {out.with_suffix('.png')} ({result['wall_s']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
