r"""``polyak posthoc``: rebuild a sweep of EMA lengths from post-hoc snapshots, and choose one.

:func:`sweep` rebuilds the power-function EMA of every requested :math:`\sigma_{rel}` from a
snapshot directory in one pass over its files (:func:`polyak.posthoc.reconstruct` with several
``sigma_rel``; EDM2, Karras et al. 2024, App. C.3). With ``evaluate=True`` the snapshots must be
those ``polyak demo --posthoc`` wrote: the run is found from the directory (its ``metrics.json``
one or two levels up), the demo's data is rebuilt as the run saw it (the same validation split,
held out of training, and the same test split), and each reconstruction is scored as the demo
scores an average at the end of training (:func:`polyak.demo.train.evaluate_weights`: BatchNorm
statistics recomputed first with ``bn="recompute"``). The best is chosen on the validation split
alone, by accuracy and then by the lower validation loss; its test accuracy is what to report.
:func:`save` writes the table (``sweep.json``), the plot (``sweep.png``) and the weights: the best
as ``best.safetensors`` (its BatchNorm statistics as evaluated, loadable into a plain
``SeedCNN`` with ``strict=True``), or, without evaluation, every reconstruction.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polyak import posthoc
from polyak.io import atomic_path, save_safetensors

__all__ = ["DemoRun", "Sweep", "best_row", "find_run", "save", "sigma_rel_grid", "sweep"]

_METRICS = "metrics.json"


def sigma_rel_grid(start: float, stop: float, num: int) -> list[float]:
    r"""``num`` evenly spaced :math:`\sigma_{rel}` from ``start`` to ``stop`` (both included,
    ``start + k (stop - start) / (num - 1)``), rounded to 10 decimals, each in (0, 0.2887).

    Raises:
        ValueError: ``num < 2``, ``start >= stop``, or an end outside (0, sqrt(1/12)).
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 2:
        raise ValueError(
            f"a sigma_rel sweep needs num >= 2 values, got num={num!r}; for one value give it "
            f"alone, e.g. 0.10."
        )
    if not start < stop:
        raise ValueError(
            f"a sigma_rel sweep goes from start to a larger stop, got start={start!r}, "
            f"stop={stop!r}; e.g. 0.02:0.28:14."
        )
    for value in (start, stop):
        posthoc.sigma_rel_to_gamma(value)  # raises with the range
    return [round(start + k * (stop - start) / (num - 1), 10) for k in range(num)]


# ---------------------------------------------------------------------------- the demo run


@dataclasses.dataclass(frozen=True)
class DemoRun:
    """The ``polyak demo --posthoc`` run a snapshot directory belongs to: its ``--out``
    directory, its ``metrics.json`` and the entry of ``metrics["runs"]`` of that seed."""

    out: Path
    metrics: dict[str, Any]
    run: dict[str, Any]

    @property
    def seed(self) -> int:
        return int(self.run["seed"])

    def config(self, device: str | torch.device = "cpu") -> Any:
        """The run's :class:`~polyak.demo.train.DemoConfig` for evaluating on ``device``:
        ``amp`` and ``channels_last`` take that device's defaults, everything else is the
        run's."""
        from polyak.demo.train import DemoConfig

        fields = {f.name for f in dataclasses.fields(DemoConfig)}
        saved = {k: v for k, v in self.metrics["config"].items() if k in fields}
        saved |= {"device": str(device), "amp": None, "channels_last": None}
        return DemoConfig(**saved).resolved()


def find_run(snapshot_dir: str | os.PathLike[str]) -> DemoRun:
    """The demo run whose snapshots are in ``snapshot_dir`` (``<out>/posthoc`` or
    ``<out>/posthoc/seed-<n>``): the ``metrics.json`` one or two levels up that lists it.

    Raises:
        FileNotFoundError: no such ``metrics.json``, or none that lists this directory.
    """
    directory = Path(snapshot_dir).resolve()
    looked = []
    for out in (directory.parent, directory.parent.parent):
        path = out / _METRICS
        looked.append(str(path))
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text(encoding="utf-8"))
        for run in metrics.get("runs", []):
            if "posthoc" in run and (out / run["posthoc"]["dir"]).resolve() == directory:
                return DemoRun(out, metrics, run)
    raise FileNotFoundError(
        f"--eval evaluates snapshots that `polyak demo --posthoc` wrote, but no metrics.json of "
        f"such a run lists {str(snapshot_dir)!r} (looked at {looked}). Pass the directory the "
        "demo printed (OUT/posthoc, or OUT/posthoc/seed-<n> with several seeds), or leave "
        "--eval out to only rebuild the weights."
    )


# ---------------------------------------------------------------------------- the sweep


@dataclasses.dataclass
class Sweep:
    """A reconstructed sweep: one row per ``sigma_rel`` (``sigma_rel``, ``gamma``, and with an
    evaluation ``val_acc``, ``val_loss``, ``test_acc``), the index of the best row (by
    validation; ``None`` without an evaluation), and the weights: ``states`` (every
    reconstruction) or, with an evaluation, ``best_state`` (the best, as evaluated)."""

    snapshot_dir: Path
    at: int
    snapshots: int
    rows: list[dict[str, Any]]
    best: int | None = None
    states: list[dict[str, torch.Tensor]] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    run: DemoRun | None = None
    compare: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The table as plain data (what ``sweep.json`` holds)."""
        out: dict[str, Any] = {
            "snapshot_dir": str(self.snapshot_dir),
            "at": self.at,
            "snapshots": self.snapshots,
            "rows": self.rows,
            "best": None if self.best is None else self.rows[self.best],
            "selection": "highest val_acc, then lowest val_loss",
        }
        if self.run is not None:
            out["run"] = {"out": str(self.run.out), "seed": self.run.seed}
            out["dataset"] = self.run.metrics["config"]["dataset"]
            out["compare"] = self.compare
        return out


def best_row(rows: Sequence[dict[str, Any]]) -> int:
    """The index of the row with the highest ``val_acc``; among equal accuracies the lowest
    ``val_loss``, then the first. Only validation scores are read: the test split never
    influences the choice."""
    if not rows:
        raise ValueError("best_row needs at least one evaluated row, got none.")
    return min(range(len(rows)), key=lambda i: (-rows[i]["val_acc"], rows[i]["val_loss"], i))


def sweep(
    snapshot_dir: str | os.PathLike[str],
    sigma_rels: Sequence[float],
    at: int | None = None,
    *,
    evaluate: bool = False,
    device: str | torch.device = "cpu",
) -> Sweep:
    """Rebuild the EMA of each ``sigma_rel`` at step ``at`` (default: the last snapshot) from
    ``snapshot_dir`` in one pass over its files; with ``evaluate``, score each on the demo run's
    validation and test splits and keep the best by validation (see the module docstring).

    Raises:
        FileNotFoundError: a missing directory, index or file, or (``evaluate``) no demo run.
        ValueError: a ``sigma_rel`` outside (0, 0.2887), an ``at`` without snapshots, an empty
            index, or (``evaluate``) a run without a validation split.
    """
    directory = Path(snapshot_dir)
    sigma_rels = [float(s) for s in sigma_rels]
    gammas = [posthoc.sigma_rel_to_gamma(s) for s in sigma_rels]  # checks before any reading
    run = config = None
    if evaluate:  # before the files are read
        run = find_run(directory)
        config = run.config(device)
        if not config.val_fraction:
            raise ValueError(
                f"the demo run in {str(run.out)!r} held out no validation split (val_fraction "
                f"{config.val_fraction}), and choosing the EMA length on the test split would "
                "bias the test accuracy reported. Re-run the demo with --posthoc (which holds "
                "out 0.2 of the training images) or with --val-fraction F."
            )
    snaps = posthoc.read_index(directory)
    states = posthoc.reconstruct(directory, sigma_rels, at, device="cpu")
    at = at if at is not None else snaps[-1].step
    used = sum(1 for s in snaps if s.step <= at)
    rows = [{"sigma_rel": s, "gamma": g} for s, g in zip(sigma_rels, gammas, strict=True)]
    result = Sweep(directory, at, used, rows)
    if run is None:
        result.states = states  # type: ignore[assignment]
        return result
    result.run = run
    if at == run.metrics["config"]["total_steps"]:  # the fixed schedules, at the same step
        result.compare = run.run["final"].get("compare", {})
    _evaluate(result, states, run.seed, config)  # type: ignore[arg-type]
    return result


def _evaluate(result: Sweep, states: list[dict[str, torch.Tensor]], seed: int, config: Any) -> None:
    from polyak.demo.model import SeedCNN
    from polyak.demo.train import _deterministic, device_data_for, evaluate_weights, load_dataset

    image = load_dataset(config)
    data = device_data_for(config, image)

    def new_model() -> torch.nn.Module:
        return SeedCNN(config.width, in_channels=image.channels, num_classes=image.num_classes)

    copied = _live_buffers(result, new_model()) if config.bn == "copy" else {}
    with _deterministic(data.device):
        for i, (row, state) in enumerate(zip(result.rows, states, strict=True)):
            model = new_model()
            model.load_state_dict(state | copied, strict=True)
            row |= evaluate_weights(model.to(data.device), data, config, seed)
            if best_row(result.rows[: i + 1]) == i:  # the best so far: keep its weights
                result.best = i
                result.best_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _live_buffers(result: Sweep, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s floating buffers as a snapshot at ``result.at`` holds them: with
    ``bn="copy"`` they are the live model's statistics at that step, which the weighted sum over
    snapshots would blur."""
    from safetensors import safe_open

    names = [name for name, b in model.named_buffers() if b.is_floating_point()]
    snap = next(s for s in posthoc.read_index(result.snapshot_dir) if s.step == result.at)
    with safe_open(str(snap.path), framework="pt") as f:
        return {name: f.get_tensor(name).clone() for name in names}


# ---------------------------------------------------------------------------- the files


def _file(sigma_rel: float) -> str:
    return f"sigma_rel-{sigma_rel:.4f}.safetensors"


def save(result: Sweep, out: str | os.PathLike[str], plot: bool = True) -> list[Path]:
    """Write ``sweep.json``, ``sweep.png`` (with an evaluation and ``plot``) and the weights to
    ``out`` (created if missing), each atomically; returns the paths written.

    The weights: ``best.safetensors`` with an evaluation (metadata ``polyak.sigma_rel``,
    ``polyak.step``), else ``sigma_rel-<s>.safetensors`` per row. Both load into a plain model
    with ``model.load_state_dict(safetensors.torch.load_file(path), strict=True)``.
    """
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if result.best is not None and result.best_state is not None:
        best = result.rows[result.best]
        path = directory / "best.safetensors"
        meta = {"polyak.sigma_rel": repr(best["sigma_rel"]), "polyak.step": str(result.at)}
        save_safetensors(result.best_state, path, meta)
        written.append(path)
    for row, state in zip(result.rows, result.states or [], strict=False):
        path = directory / _file(row["sigma_rel"])
        save_safetensors(state, path, {"polyak.sigma_rel": repr(row["sigma_rel"])})
        written.append(path)
    path = directory / "sweep.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    written.append(path)
    if plot and result.best is not None:
        from polyak.demo.plot import plot_sweep

        path = directory / "sweep.png"
        plot_sweep(result.to_json(), path)
        written.append(path)
    return written
