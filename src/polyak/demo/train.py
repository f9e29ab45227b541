"""The demo's training loop: the seed CNN with SGD, raw and EMA test accuracy per epoch.

One run per seed: SGD (Nesterov momentum) on the seed's CNN, :class:`polyak.EMA` updated after
every optimizer step, and at the end of every epoch the test accuracy of the raw weights and of
the averages. The averages are evaluated in the model itself through ``ema.swapped()``, as the
seed's custom getter does, with no second model; with ``bn="recompute"`` they are evaluated in
``ema.averaged_module()`` after :func:`polyak.bn.update_bn` recomputed its statistics.

The decay follows seed 002's lesson by default: ``schedules.tf_warmup(decay)``, TF's
``min(decay, (1 + n) / (10 + n))`` with ``n`` the update count, so the average forgets the random
initial weights within the first few dozen steps; ``warmup=False`` uses the constant decay from
step 1 and the average stays near its initialisation (chance accuracy) for about ``1 / (1 - d)``
steps.

On the CPU a run is reproducible: the same seed and thread count give the same numbers, bit for
bit. Each seed's run forks torch's global generator and seeds it (initialisation and dropout
draw from it; data order and augmentation have their own seeded generators), evaluations run on
a fork of their own so that ``update_bn``'s dropout does not shift training's draws, and
``torch.use_deterministic_algorithms(True)`` is on during the run. A different thread count or
CPU changes the floating-point reduction order and so the numbers; on CUDA, ``cudnn.benchmark``
picks algorithms by timing and runs are not bit-reproducible.

:func:`run_demo` prints a table, writes ``metrics.json`` (atomically) and ``accuracy.png``, and
returns the metrics; it leaves torch's global generator, thread count and deterministic-algorithms
flag as it found them.

Post-hoc EMA (``posthoc=True``, ``polyak demo --posthoc``): beside its EMA each run keeps a
:class:`polyak.posthoc.PowerEMA` (one EMA, a slot per ``posthoc_sigma_rels``) and writes its
snapshots to ``<out>/posthoc`` (``<out>/posthoc/seed-<n>`` with several seeds), from which
``polyak posthoc`` rebuilds and evaluates any EMA length after training (:mod:`polyak.demo.sweep`).
A validation split (``val_fraction``, 0.2 by default with ``posthoc``) is then held out of the
training images, so that the length can be chosen on data that is neither trained nor tested on.
``compare`` adds EMAs of fixed schedules (slots of one more EMA), evaluated at the end on the
validation and test splits as the sweep evaluates its reconstructions (:func:`evaluate_weights`).
Without these options nothing of this runs: the default demo is unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import polyak
from polyak import averagers, schedules
from polyak.bn import BatchNormMonitor, update_bn
from polyak.demo.data import DeviceData, ImageData, load_cifar10, load_digits
from polyak.demo.model import SeedCNN
from polyak.io import atomic_path

__all__ = [
    "DATASET_DEFAULTS",
    "POSTHOC_DIR",
    "DemoConfig",
    "bn_batches",
    "check_out_dir",
    "check_snapshot_dir",
    "device_data_for",
    "evaluate",
    "evaluate_weights",
    "load_dataset",
    "run_demo",
    "score",
    "summarize",
]

#: Per-dataset defaults for the options left as ``None`` in :class:`DemoConfig`.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    # digits: SGD at a high constant lr with weight decay never settles. Weight decay shrinks the
    # BatchNorm-scaled weights until the steps are too large for them, so the raw weights keep
    # bouncing, and their running BatchNorm statistics lag behind; the average of the last few
    # dozen steps, with statistics recomputed for it (bn="recompute"), is a good classifier.
    # Seeds 0-9, 1 thread: raw 74.6 ± 8.7%, EMA 97.3 ± 0.5%, EMA - raw 22.8 ± 8.8 points (at
    # least 10.2); 2 threads: raw 75.0 ± 12.6%, EMA 97.7 ± 0.4%, EMA - raw 22.6 ± 12.7 (at least
    # 8.9). The margin is about 2 standard deviations per seed, so the default reports 3 seeds'
    # mean, whose margin is about 3.5 of its standard deviations.
    # Without weight decay (lr 0.5) the raw weights settle and the margin was 0.8 ± 1.0 points,
    # negative on some seeds: too small to show on every machine.
    "digits": {
        "seeds": 3,
        "width": 32,
        "epochs": 15,
        "batch_size": 64,
        "lr": 0.5,
        "weight_decay": 5e-3,
        "decay": 0.99,
        "bn": "recompute",
    },
    "cifar10": {
        "seeds": 1,
        "width": 96,
        "epochs": 30,
        "batch_size": 128,
        "lr": 0.05,
        "weight_decay": 5e-4,
        "decay": 0.998,
        "bn": "average",
    },
}
_BUFFERS = {"average": "average", "copy": "copy", "recompute": "none"}
_EVAL_BATCH = 1000
_POSTHOC_VAL_FRACTION = 0.2  # val_fraction's default with posthoc=True
_SNAPSHOTS = 32  # snapshot_every's default: about this many snapshots per run
POSTHOC_DIR = "posthoc"


@dataclasses.dataclass
class DemoConfig:
    """Options of ``polyak demo``; ``None`` means the dataset's default (:data:`DATASET_DEFAULTS`).

    ``steps``, when given, is the number of optimizer steps and ``epochs`` follows from it (the
    last epoch may be partial); otherwise ``epochs`` full passes of ``len(train) // batch_size``
    steps are made. ``schedule`` (``NAME[:key=value,...]``, see :func:`polyak.schedules.parse`)
    replaces ``decay`` and ``warmup``. ``amp`` (bf16 autocast) and ``channels_last`` default to
    on for CUDA devices and off elsewhere. CIFAR-10 training batches are augmented (random crop
    after 4-pixel zero padding, horizontal flip); digits are not (a flipped digit is another
    digit). ``bn_batches`` training batches, augmented the same way, feed ``update_bn`` for
    ``bn="recompute"``.

    ``val_fraction`` of the training images (by class, fixed:
    :meth:`~polyak.demo.data.ImageData.with_validation`) are held out for validation; ``None``
    means 0.2 with ``posthoc`` and 0 (train on all) without. ``posthoc`` keeps power-function
    EMAs of widths ``posthoc_sigma_rels`` and writes snapshots every ``snapshot_every`` steps
    (``None``: about 32 per run) to ``<out>/posthoc``. ``compare``: schedule specs (as
    ``schedule``) of further EMAs whose final validation and test accuracy are reported.
    """

    dataset: str = "digits"
    data: str | None = None
    parts: list[int] | None = None
    device: str = "cpu"
    epochs: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    lr_schedule: str = "constant"
    lr_warmup: int = 0
    momentum: float = 0.9
    weight_decay: float | None = None
    label_smoothing: float = 0.0
    width: int | None = None
    seeds: int | None = None
    seed: int = 0
    amp: bool | None = None
    channels_last: bool | None = None
    compile: bool = False
    threads: int | None = None
    decay: float | None = None
    schedule: str | None = None
    warmup: bool = True
    bn: str | None = None
    bn_batches: int = 64
    out: str = "polyak-demo"
    progress: bool = True
    plot: bool = True
    val_fraction: float | None = None
    posthoc: bool = False
    posthoc_sigma_rels: tuple[float, ...] = (0.05, 0.10)
    snapshot_every: int | None = None
    compare: tuple[str, ...] = ()

    def resolved(self) -> DemoConfig:
        """A copy with the dataset defaults filled in and every option checked."""
        if self.dataset not in DATASET_DEFAULTS:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; choose one of {sorted(DATASET_DEFAULTS)}."
            )
        defaults = DATASET_DEFAULTS[self.dataset]
        filled = {
            key: defaults[key] if getattr(self, key) is None else getattr(self, key)
            for key in ("seeds", "width", "batch_size", "lr", "weight_decay", "decay", "bn")
        }
        if self.epochs is None and self.steps is None:
            filled["epochs"] = defaults["epochs"]
        device = torch.device(self.device)
        on_cuda = device.type == "cuda"
        filled["amp"] = on_cuda if self.amp is None else self.amp
        filled["channels_last"] = on_cuda if self.channels_last is None else self.channels_last
        if self.val_fraction is None:
            filled["val_fraction"] = _POSTHOC_VAL_FRACTION if self.posthoc else 0.0
        filled["posthoc_sigma_rels"] = tuple(self.posthoc_sigma_rels)
        filled["compare"] = tuple(self.compare)
        config = dataclasses.replace(self, **filled)
        config._check()
        return config

    def _check(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"lr_schedule must be 'constant' or 'cosine', got lr_schedule={self.lr_schedule!r}."
            )
        if self.bn not in _BUFFERS:
            raise ValueError(f"bn must be one of {sorted(_BUFFERS)}, got bn={self.bn!r}.")
        for name in ("batch_size", "width", "seeds", "bn_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}.")
        for name in ("epochs", "steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {name}={value!r}.")
        if self.epochs is not None and self.steps is not None:
            raise ValueError(
                f"give epochs or steps, not both: got epochs={self.epochs}, steps={self.steps}."
            )
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got lr={self.lr!r}.")
        if self.lr_warmup < 0:
            raise ValueError(f"lr_warmup must be >= 0 steps, got lr_warmup={self.lr_warmup!r}.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing=}.")
        if self.schedule is None and not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got decay={self.decay!r}; e.g. 0.99.")
        if self.schedule is not None:
            self.decay_schedule()  # raises on a bad NAME[:key=value,...]
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 <= self.val_fraction < 1.0):
            raise ValueError(
                f"val_fraction must be in [0, 1), got val_fraction={self.val_fraction!r}; e.g. "
                "0.2 holds out a fifth of the training images for validation."
            )
        if self.snapshot_every is not None and (
            not isinstance(self.snapshot_every, int) or self.snapshot_every < 1
        ):
            raise ValueError(
                f"snapshot_every must be a positive int or None, got "
                f"snapshot_every={self.snapshot_every!r}."
            )
        if self.posthoc:
            from polyak.posthoc import sigma_rel_to_gamma

            for sigma_rel in self.posthoc_sigma_rels:
                sigma_rel_to_gamma(sigma_rel)  # raises with the range
            if not self.posthoc_sigma_rels or len(set(self.posthoc_sigma_rels)) != len(
                self.posthoc_sigma_rels
            ):
                raise ValueError(
                    f"posthoc_sigma_rels must be distinct values, at least one, got "
                    f"{list(self.posthoc_sigma_rels)}; e.g. 0.05,0.10 (EDM2's)."
                )
        self.compare_schedules()  # raises on a bad spec
        if self.dataset == "cifar10" and self.data is None:
            raise ValueError(
                "the cifar10 dataset needs data=PATH (--data): a directory of part-<i>.npz files, "
                "a single .npz, or the official cifar-10-batches-bin directory."
            )
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"device={self.device!r} was asked for, but this PyTorch build sees no CUDA device "
                f"(torch {torch.__version__}); use --device cpu or a machine with a GPU."
            )

    def decay_schedule(self) -> Callable[[int], float]:
        """The EMA decay: the parsed ``schedule``, else ``tf_warmup(decay)`` or ``constant(decay)``."""
        if self.schedule is not None:
            from polyak.schedules import parse as parse_schedule

            return parse_schedule(self.schedule)
        if self.decay is None:
            raise ValueError("decay is None: call config.resolved() to fill in the default.")
        return schedules.tf_warmup(self.decay) if self.warmup else schedules.constant(self.decay)

    def compare_schedules(self) -> dict[str, Callable[[int], float]]:
        """``compare``'s specs and their parsed schedules, in order."""
        from polyak.schedules import parse as parse_schedule

        specs = list(self.compare)
        if len(set(specs)) != len(specs):
            raise ValueError(f"compare must not repeat a schedule, got compare={specs}.")
        return {spec: parse_schedule(spec) for spec in specs}


def load_dataset(config: DemoConfig) -> ImageData:
    """The dataset ``config`` names, read from ``config.data`` for CIFAR-10, with the validation
    split of ``config.val_fraction`` held out of its training images when that is > 0."""
    if config.dataset == "digits":
        image = load_digits()
    elif config.data is None:
        raise ValueError(
            f"dataset {config.dataset!r} needs data=PATH (--data): a directory of part-<i>.npz "
            "files, a single .npz, or the official cifar-10-batches-bin directory."
        )
    else:
        image = load_cifar10(config.data, parts=config.parts)
    return _split(image, config)


def _split(image: ImageData, config: DemoConfig) -> ImageData:
    if config.val_fraction and image.x_val is None:
        return image.with_validation(config.val_fraction)
    return image


def device_data_for(config: DemoConfig, image: ImageData) -> DeviceData:
    """``image`` on ``config.device`` as the demo trains on it (CIFAR-10 augmented, digits not)."""
    augment = config.dataset == "cifar10"
    return DeviceData(
        image,
        torch.device(config.device),
        padding=4 if augment else 0,
        flip=augment,
        channels_last=config.channels_last,
    )


def check_out_dir(out: str | os.PathLike[str]) -> Path:
    """Create the results directory ``out`` if missing and check that a file can be made in it.

    :func:`run_demo` calls it before training, so that a bad ``--out`` is reported in a second,
    not after the run when ``metrics.json`` is written.

    Raises:
        ValueError: ``out`` is a file, lies under a file, or cannot be created or written to; the
            message names the path, the reason and the fix.
    """
    path = Path(out)
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a directory")
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".polyak-demo-", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ValueError(
            f"cannot write metrics.json and accuracy.png to --out {str(path)!r}: {reason}. "
            "Give a directory you can write to (it is created if missing), e.g. "
            "--out ./polyak-demo."
        ) from error
    return path


def check_snapshot_dir(out: str | os.PathLike[str]) -> Path:
    """``<out>/posthoc``, where ``posthoc=True`` writes snapshots; refused if it holds files.

    Snapshots of two runs in one directory would be rebuilt as one run, so an earlier run's
    directory is never added to (nor deleted: it may be the only copy of a long run).

    Raises:
        ValueError: the directory exists and is not empty; the message says how to fix it.
    """
    path = Path(out) / POSTHOC_DIR
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(
            f"{str(path)!r} already holds post-hoc snapshots (or other files) from an earlier "
            "run; snapshots of two runs cannot share a directory. Remove it, or choose another "
            "--out."
        )
    return path


def _lr_factor(config: DemoConfig, total_steps: int) -> Callable[[int], float]:
    """The multiplier of the learning rate at optimizer step ``t`` (0-based): warm-up, then flat or cosine."""
    warm = config.lr_warmup

    def factor(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        if config.lr_schedule == "constant":
            return 1.0
        progress = (t - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def evaluate(model: nn.Module, data: DeviceData, amp: bool = False, split: str = "test") -> float:
    """Accuracy of ``model`` in eval mode on ``split`` ("test" or "val"; its training flags are
    restored afterwards)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=data.device)
    total = 0
    try:
        for images, labels in data.batches(split, _EVAL_BATCH):
            with torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(images)
            correct += (logits.argmax(dim=1) == labels).sum()
            total += int(labels.shape[0])
    finally:
        for m, training in modes:
            m.training = training
    return correct.item() / total


@torch.no_grad()
def score(
    model: nn.Module, data: DeviceData, amp: bool = False, split: str = "val"
) -> dict[str, float]:
    """``{"acc", "loss"}`` of ``model`` in eval mode on ``split``: accuracy, and the mean
    cross-entropy :math:`-\frac{1}{N}\\sum_i \\log p_\theta(y_i \\mid x_i)` (float32 logits)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=data.device)
    loss = torch.zeros((), dtype=torch.float64, device=data.device)
    total = 0
    try:
        for images, labels in data.batches(split, _EVAL_BATCH):
            with torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(images)
            correct += (logits.argmax(dim=1) == labels).sum()
            loss += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            total += int(labels.shape[0])
    finally:
        for m, training in modes:
            m.training = training
    return {"acc": correct.item() / total, "loss": loss.item() / total}


def bn_batches(data: DeviceData, config: DemoConfig, seed: int) -> Iterator[torch.Tensor]:
    """The training batches ``update_bn`` sees for ``bn="recompute"`` in seed ``seed``'s run:
    ``config.bn_batches`` augmented batches (fewer if an epoch is shorter), from generators of
    their own seeded with ``seed + 1``, so every evaluation of the run sees the same ones."""
    order = torch.Generator().manual_seed(seed + 1)
    augment = torch.Generator(data.device).manual_seed(seed + 1)
    bs = config.batch_size
    perm = torch.randperm(data.num_train, generator=order).to(data.device)
    for i in range(min(config.bn_batches, data.num_train // bs)):
        yield data.train_batch(perm[i * bs : (i + 1) * bs], augment)[0]


def evaluate_weights(
    model: nn.Module, data: DeviceData, config: DemoConfig, seed: int
) -> dict[str, float]:
    """Validation and test scores of the weights ``model`` holds, as the demo evaluates an
    average at the end of seed ``seed``'s run (fixed-schedule EMAs, post-hoc reconstructions).

    With ``config.bn == "recompute"`` the BatchNorm statistics of ``model`` are recomputed first
    (:func:`polyak.bn.update_bn` over :func:`bn_batches`, in place), with torch's generator
    forked and seeded with ``seed`` for update_bn's dropout: the same weights always get the same
    statistics, whichever process evaluates them and whatever ran before. Returns ``test_acc``,
    and ``val_acc`` and ``val_loss`` when ``data`` has a validation split.
    """
    with _seeded(data.device, seed):
        if config.bn == "recompute":
            with torch.autocast(data.device.type, dtype=torch.bfloat16, enabled=config.amp):
                update_bn(bn_batches(data, config, seed), model)
        scores = {"test_acc": evaluate(model, data, config.amp)}
        if data.x_val is not None:
            val = score(model, data, config.amp, split="val")
            scores |= {"val_acc": val["acc"], "val_loss": val["loss"]}
    return scores


def _std(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; 0 for one seed) over the seeds' runs."""
    final = {
        key: {
            "mean": float(np.mean([run["final"][key] for run in runs])),
            "std": _std([run["final"][key] for run in runs]),
        }
        for key in ("raw_acc", "ema_acc")
    }
    if "compare" in runs[0]["final"]:
        final["compare"] = {
            spec: {
                key: {
                    "mean": float(np.mean([run["final"]["compare"][spec][key] for run in runs])),
                    "std": _std([run["final"]["compare"][spec][key] for run in runs]),
                }
                for key in scores
            }
            for spec, scores in runs[0]["final"]["compare"].items()
        }
    per_epoch = []
    for i, row in enumerate(runs[0]["epochs"]):
        rows = [run["epochs"][i] for run in runs]
        entry = {"epoch": row["epoch"], "step": row["step"]}
        for key in ("raw_acc", "ema_acc", "loss", "time"):
            values = [r[key] for r in rows]
            entry[f"{key}_mean"] = float(np.mean(values))
            entry[f"{key}_std"] = _std(values)
        per_epoch.append(entry)
    return {"seeds": len(runs), "std": "sample (ddof=1)", "final": final, "per_epoch": per_epoch}


def _environment(device: torch.device) -> dict[str, Any]:
    env = {
        "machine": platform.machine(),
        "platform": platform.platform(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "polyak": polyak.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


class _Printer:
    """The per-epoch table, written through tqdm so the progress bar stays intact."""

    HEADER = f"{'seed':>4} {'epoch':>6} {'step':>6} {'loss':>7} {'raw acc':>8} {'EMA acc':>8} {'time':>7}"

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, line: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(line, file=self.stream)
        self.stream.flush()

    def row(self, seed: int, row: dict[str, Any]) -> None:
        self.write(
            f"{seed:>4} {row['epoch']:>6.4g} {row['step']:>6} {row['loss']:>7.4f} "
            f"{100 * row['raw_acc']:>7.2f}% {100 * row['ema_acc']:>7.2f}% {row['time']:>6.1f}s"
        )


class _Run:
    """One seed's training run."""

    def __init__(
        self,
        config: DemoConfig,
        data: DeviceData,
        image: ImageData,
        seed: int,
        posthoc_dir: Path | None = None,
        snapshot_every: int | None = None,
    ) -> None:
        self.config = config
        self.data = data
        self.seed = seed
        self.device = data.device
        # Init and dropout draw from torch's global generator, which the caller has forked and
        # seeded with ``seed`` (_seeded); data order and augmentation have their own generators.
        model = SeedCNN(config.width, in_channels=image.channels, num_classes=image.num_classes)
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory_format)
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.momentum > 0,
            weight_decay=config.weight_decay,
        )
        self.ema = polyak.EMA(
            self.model, decay=config.decay_schedule(), buffers=_BUFFERS[config.bn]
        )
        # polyak.EMA itself watches for statistics that stall while weights move (monitor.check);
        # this monitor serves the evaluation side of bn="recompute" (note_update / check_eval).
        self.monitor = BatchNormMonitor(self.model)
        self.order = torch.Generator().manual_seed(seed)
        self.augment = torch.Generator(self.device).manual_seed(seed)
        self.posthoc = self.compare = None
        if posthoc_dir is not None:  # one EMA, a slot per sigma_rel, one pass per update
            from polyak.posthoc import PowerEMA

            self.posthoc = PowerEMA(
                self.model,
                config.posthoc_sigma_rels,
                snapshot_every=snapshot_every,
                snapshot_dir=posthoc_dir,
                batch_size=config.batch_size,
                buffers=_BUFFERS[config.bn],
            )
        if config.compare:  # the fixed schedules: one more EMA, a slot each
            compared = config.compare_schedules()
            self.compare = polyak.EMA(
                self.model,
                rule=averagers.Exponentials(tuple(compared.values()), names=tuple(compared)),
                buffers=_BUFFERS[config.bn],
            )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp)

    def evaluate_ema(self) -> float:
        if self.config.bn == "recompute":
            averaged = self.ema.averaged_module()
            with self._autocast():
                update_bn(bn_batches(self.data, self.config, self.seed), averaged)
            self.monitor.check_eval(averaged)
            return evaluate(averaged, self.data, self.config.amp)
        with self.ema.swapped():
            return evaluate(self.forward, self.data, self.config.amp)

    def train(self, total_steps: int, steps_per_epoch: int, bar: Any, printer: _Printer) -> dict:
        config = self.config
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_factor(config, total_steps)
        )
        rows = []
        step = 0
        start = time.perf_counter()
        train_time = 0.0
        epoch = 0
        while step < total_steps:
            epoch += 1
            tic = time.perf_counter()
            perm = torch.randperm(self.data.num_train, generator=self.order).to(self.device)
            loss_sum = torch.zeros((), device=self.device)
            steps = min(steps_per_epoch, total_steps - step)
            self.model.train()
            for i in range(steps):
                index = perm[i * config.batch_size : (i + 1) * config.batch_size]
                images, labels = self.data.train_batch(index, self.augment)
                with self._autocast():
                    logits = self.forward(images)
                    loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                scheduler.step()
                self.ema.update()  # also checks for stale BatchNorm statistics (seed 004)
                if self.posthoc is not None:
                    self.posthoc.update()
                if self.compare is not None:
                    self.compare.update()
                if config.bn == "recompute":
                    self.monitor.note_update()
                loss_sum += loss.detach().float()
                bar.update(1)
            step += steps
            loss = loss_sum.item() / steps  # one host sync per epoch
            train_time += time.perf_counter() - tic
            # update_bn (bn="recompute") runs dropout in train mode: evaluating must not move the
            # generator that training's dropout draws from, or the evaluation would change the
            # raw weights' trajectory.
            with _seeded(self.device, None):
                raw_acc = evaluate(self.forward, self.data, config.amp)
                ema_acc = self.evaluate_ema()
            row = {
                "epoch": round(step / steps_per_epoch, 4),
                "step": step,
                "loss": loss,
                "raw_acc": raw_acc,
                "ema_acc": ema_acc,
                "time": time.perf_counter() - start,
                "train_time": train_time,
                "decay": float(self.ema.schedule(self.ema.step)),
            }
            rows.append(row)
            printer.row(self.seed, row)
        result = {
            "seed": self.seed,
            "epochs": rows,
            "final": {"raw_acc": rows[-1]["raw_acc"], "ema_acc": rows[-1]["ema_acc"]},
            "wall_s": time.perf_counter() - start,
            "train_s": train_time,
        }
        if self.posthoc is not None:
            self.posthoc.close()  # the final state, at the last step
            result["posthoc"] = {
                "dir": str(self.posthoc.snapshot_dir),
                "sigma_rels": list(self.posthoc.sigma_rels),
                "snapshot_every": self.posthoc.snapshot_every,
            }
        if self.compare is not None:
            result["final"]["compare"] = {
                slot: evaluate_weights(
                    self.compare.averaged_module(slot=slot), self.data, config, self.seed
                )
                for slot in self.compare.slots
            }
        return result


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int | None) -> Iterator[None]:
    """Fork torch's global generators (CPU, and ``device``'s if CUDA), seeded with ``seed``.

    Inside, the global generator is set with ``torch.manual_seed(seed)`` (left as it is for
    ``None``); on exit the state from before is restored, so neither a seed's run nor an
    evaluation moves the generator the code around it draws from.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        if seed is not None:
            torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """On the CPU, ``torch.use_deterministic_algorithms(True)`` inside; restored on exit.

    PyTorch's CPU kernels used here are deterministic for a fixed thread count; the flag makes
    any that is not raise instead of silently changing the numbers from run to run. On CUDA
    nothing changes: ``cudnn.benchmark`` picks convolution algorithms by timing, so GPU runs are
    fast rather than bit-reproducible.
    """
    if device.type != "cpu":
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def run_demo(
    config: DemoConfig, data: ImageData | None = None, stream: TextIO | None = None
) -> dict[str, Any]:
    """Train ``config.seeds`` runs, print the per-epoch table, write ``metrics.json`` and the plot.

    Args:
        config: the options (unresolved ``None`` fields take the dataset defaults). With
            ``threads``, torch's CPU thread count is set for the run and restored afterwards.
        data: the dataset, if already loaded (else :func:`load_dataset`).
        stream: where the table goes (default ``sys.stdout``); the progress bar goes to stderr.

    Returns:
        The metrics written to ``<out>/metrics.json``: ``config``, ``environment``, ``date``,
        ``runs`` (per seed: per-epoch rows with ``epoch, step, loss, raw_acc, ema_acc, time``
        and the final accuracies) and ``summary`` (mean and standard deviation over seeds).
    """
    config = config.resolved()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_demo(config, data, stream)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _run_demo(config: DemoConfig, data: ImageData | None, stream: TextIO | None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    out = check_out_dir(config.out)  # before training, not when the results are written
    posthoc_root = check_snapshot_dir(out) if config.posthoc else None
    image = load_dataset(config) if data is None else _split(data, config)
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    device_data = device_data_for(config, image)
    steps_per_epoch = device_data.num_train // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch_size={config.batch_size} exceeds the {device_data.num_train} training images; "
            "use a smaller --batch-size."
        )
    total_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    snapshot_every = config.snapshot_every or max(1, total_steps // _SNAPSHOTS)
    printer = _Printer(sys.stdout if stream is None else stream)
    decay = config.schedule or (
        f"tf_warmup({config.decay})" if config.warmup else f"constant({config.decay})"
    )
    printer.write(
        f"polyak {polyak.__version__} demo: {config.dataset} ({device_data.num_train} train / "
        + ("" if image.y_val is None else f"{len(image.y_val)} validation / ")
        + f"{len(image.y_test)} test), SeedCNN width {config.width}, {total_steps} steps of batch "
        f"{config.batch_size}, lr {config.lr} ({config.lr_schedule}), EMA decay {decay}, "
        f"BatchNorm {config.bn}, device {device}"
    )
    printer.write(_Printer.HEADER)
    runs = []
    for seed in range(config.seed, config.seed + config.seeds):
        with (
            tqdm(
                total=total_steps,
                desc=f"seed {seed}",
                unit="step",
                leave=False,
                disable=not config.progress,
                file=sys.stderr,
                mininterval=0.5,
            ) as bar,
            _seeded(device, seed),
            _deterministic(device),
        ):
            snapshots = None
            if posthoc_root is not None:
                snapshots = posthoc_root / f"seed-{seed}" if config.seeds > 1 else posthoc_root
            run = _Run(config, device_data, image, seed, snapshots, snapshot_every)
            result = run.train(total_steps, steps_per_epoch, bar, printer)
            if snapshots is not None:  # relative to --out, so the run directory can move
                result["posthoc"]["dir"] = snapshots.relative_to(out).as_posix()
            runs.append(result)
    summary = summarize(runs)
    final = summary["final"]
    printer.write(
        f"final test accuracy over {len(runs)} seed(s): raw {100 * final['raw_acc']['mean']:.2f} "
        f"± {100 * final['raw_acc']['std']:.2f}%, EMA {100 * final['ema_acc']['mean']:.2f} ± "
        f"{100 * final['ema_acc']['std']:.2f}%"
    )
    for spec, scores in final.get("compare", {}).items():
        printer.write(
            f"  EMA {spec}: "
            + ", ".join(
                f"{key.removesuffix('_acc')} {100 * scores[key]['mean']:.2f} ± "
                f"{100 * scores[key]['std']:.2f}%"
                for key in ("val_acc", "test_acc")
                if key in scores
            )
        )
    extra = {"steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
    if config.posthoc:
        extra["snapshot_every"] = snapshot_every
    metrics = {
        "config": dataclasses.asdict(config) | extra,
        "environment": _environment(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "runs": runs,
        "summary": summary,
    }
    _write_json(out / "metrics.json", metrics)
    if config.plot:
        from polyak.demo.plot import plot_accuracy

        plot_accuracy(metrics, out / "accuracy.png")
    printer.write(
        f"wrote {out / 'metrics.json'}" + (f" and {out / 'accuracy.png'}" if config.plot else "")
    )
    if posthoc_root is not None:
        first = out / runs[0]["posthoc"]["dir"]
        printer.write(
            f"post-hoc EMA snapshots (sigma_rel {', '.join(map(str, config.posthoc_sigma_rels))}, "
            f"every {snapshot_every} steps) in {posthoc_root}; choose the EMA length with: "
            f"polyak posthoc --snapshots {first} --eval"
        )
    return metrics
