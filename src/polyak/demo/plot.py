"""The demo's figure: raw vs EMA test accuracy and error per epoch (mean ± std over seeds)."""

from __future__ import annotations

import os
from typing import Any

from polyak.io import atomic_path

__all__ = ["plot_accuracy", "plot_sweep"]

_ERROR_FLOOR = 0.01  # percent: where a perfect score is drawn on the log-scale error panel


def plot_accuracy(
    metrics: dict[str, Any], path: str | os.PathLike[str], title: str | None = None
) -> None:
    """Plot raw and EMA test accuracy against epochs from ``metrics`` (as :func:`run_demo` returns).

    Two panels: accuracy, and test error (100 - accuracy) on a log scale, where the gap between
    raw and averaged weights near the end of training is visible. Lines are the means over seeds;
    with more than one seed a band shows ± one (sample) standard deviation. Uses matplotlib's non-interactive Agg backend and writes the PNG atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    per_epoch = metrics["summary"]["per_epoch"]
    seeds = metrics["summary"]["seeds"]
    epochs = [row["epoch"] for row in per_epoch]
    fig = Figure(figsize=(9.6, 4.0), dpi=120)
    acc_ax, err_ax = fig.subplots(1, 2)
    for key, label, color in (
        ("raw_acc", "raw weights", "tab:gray"),
        ("ema_acc", "EMA", "tab:blue"),
    ):
        mean = [100 * row[f"{key}_mean"] for row in per_epoch]
        std = [100 * row[f"{key}_std"] for row in per_epoch]
        error = [max(100 - m, _ERROR_FLOOR) for m in mean]
        acc_ax.plot(epochs, mean, marker="o", markersize=3, color=color, label=label)
        err_ax.plot(epochs, error, marker="o", markersize=3, color=color, label=label)
        if seeds > 1:
            for ax, centre in ((acc_ax, mean), (err_ax, error)):
                ax.fill_between(
                    epochs,
                    [max(c - s, _ERROR_FLOOR) for c, s in zip(centre, std, strict=True)],
                    [c + s for c, s in zip(centre, std, strict=True)],
                    color=color,
                    alpha=0.2,
                    linewidth=0,
                )
    config = metrics["config"]
    decay = config.get("schedule") or (
        f"tf_warmup({config['decay']})" if config.get("warmup", True) else f"{config['decay']}"
    )
    if title is None:
        title = (
            f"{config['dataset']}, SeedCNN width {config['width']}, EMA {decay}, "
            f"BN {config['bn']} ({seeds} seed{'s' if seeds > 1 else ''})"
        )
    fig.suptitle(title, fontsize=9)
    band = " (mean ± std)" if seeds > 1 else ""
    acc_ax.set_ylabel(f"test accuracy (%){band}")
    err_ax.set_ylabel(f"test error (%), log scale{band}")
    err_ax.set_yscale("log")
    for ax in (acc_ax, err_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3, which="both")
    acc_ax.legend(loc="lower right")
    err_ax.legend(loc="upper right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def plot_sweep(sweep: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Plot validation and test accuracy against sigma_rel from ``sweep`` (as
    :meth:`polyak.demo.sweep.Sweep.to_json` gives it, evaluated), with the best sigma_rel by
    validation marked and the fixed-schedule EMAs of the run (``compare``) as horizontal lines.
    Agg backend; the PNG is written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = sweep["rows"]
    sigma = [row["sigma_rel"] for row in rows]
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    ax = fig.subplots()
    for key, label, color in (
        ("val_acc", "validation", "tab:orange"),
        ("test_acc", "test", "tab:blue"),
    ):
        ax.plot(
            sigma,
            [100 * row[key] for row in rows],
            marker="o",
            markersize=3,
            color=color,
            label=f"post-hoc EMA, {label}",
        )
    best = sweep["best"]
    ax.axvline(
        best["sigma_rel"],
        color="gray",
        linestyle=":",
        label=f"chosen on validation: {best['sigma_rel']:.4g}",
    )
    for (spec, scores), style in zip(
        sweep.get("compare", {}).items(),
        ("--", "-.", (0, (1, 1)), (0, (5, 1)), (0, (3, 1, 1, 1))) * 4,
        strict=False,
    ):
        ax.axhline(
            100 * scores["test_acc"],
            color="tab:green",
            linestyle=style,
            linewidth=1,
            label=f"EMA {spec}, test",
        )
    ax.set_xlabel("sigma_rel (EMA length relative to training time)")
    ax.set_ylabel("accuracy (%)")
    run = sweep.get("run", {})
    ax.set_title(
        f"{sweep.get('dataset', '')} seed {run.get('seed', '')}: post-hoc EMA at step {sweep['at']} ({sweep['snapshots']} snapshot files)",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
