r"""Post-hoc EMA (EDM2): power-function snapshots, and the EMA of any length rebuilt from them.

Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models", CVPR 2024,
Sec. 3 and App. C (reference code: NVlabs/edm2 ``training/phema.py``). Which EMA length is best is
only known after training; post-hoc EMA keeps a few power-function EMAs during training, stores
snapshots of them, and afterwards rebuilds the EMA of any other length as a weighted sum of the
snapshots. This module is the math, the files, and the tracker that writes them
(:class:`PowerEMA`, one :class:`polyak.EMA` with a slot per tracked length).

Power-function EMA
------------------
With exponent :math:`\gamma > 0`, updated at times :math:`0 = t_0 < t_1 < t_2 < \dots` (optimizer
steps, or samples seen) by

.. math::

    \hat\theta_k = \beta_k \hat\theta_{k-1} + (1 - \beta_k)\,\theta_k, \qquad
    \beta_k = \left(1 - \frac{t_k - t_{k-1}}{t_k}\right)^{\gamma + 1}

(EDM2 eq. 127; the first update has :math:`\beta_1 = 0` and copies the weights), the weight of
:math:`\theta_i` in :math:`\hat\theta` at time :math:`t = t_k` telescopes to
:math:`(t_i^{\gamma+1} - t_{i-1}^{\gamma+1}) / t^{\gamma+1}`: the average is *exactly*
:math:`\int_0^t p_{t,\gamma}(\tau)\,\theta(\tau)\,d\tau` with :math:`\theta(\tau) = \theta_i` on
:math:`(t_{i-1}, t_i]` and the profile

.. math::

    p_{t,\gamma}(\tau) = (\gamma + 1)\,\tau^{\gamma} / t^{\gamma + 1} \quad (0 < \tau \le t),

whose relative standard deviation is :math:`\sigma_{rel} = (\gamma+1)^{1/2} (\gamma+2)^{-1}
(\gamma+3)^{-1/2}` (EDM2 eq. 4; :func:`gamma_to_sigma_rel`). :math:`\gamma > 0` is
:math:`0 < \sigma_{rel} < \sqrt{1/12} \approx 0.2887`; EDM2's best values were 0.015 to 0.200.

Reconstruction
--------------
Given snapshots :math:`\hat\theta_i` (profile :math:`p_i = p_{t_i,\gamma_i}`) and a target profile
:math:`p = p_{t,\gamma}`, the weights :math:`w` minimise
:math:`\lVert \sum_i w_i p_i - p \rVert_{L^2}` (EDM2 App. C.3, Algorithm 3): they solve the normal
equations :math:`A w = b` with :math:`A_{ij} = \langle p_i, p_j\rangle`,
:math:`b_i = \langle p_i, p\rangle` and the closed form (:func:`profile_inner`)

.. math::

    \langle p_a, p_b\rangle = \frac{(\gamma_a+1)(\gamma_b+1)}{\gamma_a+\gamma_b+1}\,
    \frac{\min(t_a, t_b)^{\gamma_a+\gamma_b+1}}{t_a^{\gamma_a+1}\, t_b^{\gamma_b+1}}.

The weights are then divided by their sum, so that a run whose weights never change rebuilds that
constant exactly (EDM2 does this; ema-pytorch's ``PostHocEMA`` does not). The reconstruction is
:math:`\sum_i w_i \hat\theta_i` (:func:`solve_weights`, :func:`reconstruct`).

Snapshot files (format ``polyak.posthoc``, version 1)
----------------------------------------------------
A snapshot directory holds one safetensors file per (snapshot step, tracked sigma_rel), named
``{step:010d}-sigma_rel-{sigma_rel:.4f}.safetensors``, and ``index.json``:

- Each file is a full state dict of the model (parameter and buffer names as keys, tied weights
  stored once as in :func:`polyak.io.save_safetensors`), loadable into a plain model with
  :func:`polyak.io.load_averaged`. Floating tensors are float32, integer and bool tensors
  (``num_batches_tracked``) as given. Metadata (strings): ``"format": "pt"`` (the safetensors
  convention other loaders check), ``"polyak.format": "polyak.posthoc"``, ``"polyak.version":
  "1"``, ``"polyak.step"`` (optimizer steps), ``"polyak.samples"`` (samples seen; absent when not
  recorded), ``"polyak.gamma"`` and ``"polyak.sigma_rel"`` (Python float reprs, exact).
- ``index.json`` is ``{"format": "polyak.posthoc", "version": 1, "snapshots": [{"file", "step",
  "samples", "gamma", "sigma_rel"}, ...]}`` sorted by (step, gamma), ``samples`` ``null`` when
  not recorded. It is rewritten whole and atomically after each snapshot (files first, then the
  index), so a crash leaves an index that lists only complete files. One writer per directory.

Examples:
    >>> from polyak import posthoc
    >>> round(posthoc.sigma_rel_to_gamma(0.10), 2)
    6.94
    >>> w = posthoc.solve_weights([100, 100], [16.97, 6.94], [100], [10.0])
    >>> w.shape, round(float(w.sum()), 12)
    ((2, 1), 1.0)
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polyak import averagers, schedules
from polyak.ema import EMA
from polyak.io import ALIASES_KEY, atomic_path, save_safetensors

__all__ = [
    "FORMAT",
    "INDEX",
    "SIGMA_REL_MAX",
    "VERSION",
    "PowerEMA",
    "Snapshot",
    "gamma_to_sigma_rel",
    "profile_inner",
    "read_index",
    "reconstruct",
    "sigma_rel_to_gamma",
    "solve_weights",
    "write_snapshot",
]

FORMAT = "polyak.posthoc"
VERSION = 1
INDEX = "index.json"
SIGMA_REL_MAX = math.sqrt(1 / 12)  # sigma_rel at gamma = 0: the profile is flat
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of the dtypes averaged
_TIMES = ("steps", "samples")


# ---------------------------------------------------------------------------- sigma_rel <-> gamma


def _check_real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {name}={value!r}.")
    return float(value)


def _range_error(sigma_rel: Any) -> ValueError:
    return ValueError(
        f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}) for post-hoc EMA (gamma > 0, EDM2 eq. 4), "
        f"got sigma_rel={sigma_rel!r}; EDM2's best values were 0.015 to 0.200, it tracks 0.05 "
        f"and 0.10."
    )


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    r"""The exponent :math:`\gamma > 0` of the power-function EMA of relative width ``sigma_rel``.

    The largest real root of :math:`\gamma^3 + 7\gamma^2 + (16 - \sigma_{rel}^{-2})\gamma +
    (12 - \sigma_{rel}^{-2}) = 0` (EDM2 eq. 126, Algorithm 2), via
    :func:`polyak.schedules.sigma_rel_to_gamma`, restricted to what post-hoc reconstruction
    accepts: :math:`0 < \sigma_{rel} < \sqrt{1/12}`, i.e. :math:`\gamma > 0`. ``0.05 -> 16.97``,
    ``0.10 -> 6.94``, ``0.20 -> 1.83``.
    """
    value = _check_real(sigma_rel, "sigma_rel")
    if not 0 < value < SIGMA_REL_MAX:
        raise _range_error(sigma_rel)
    return schedules.sigma_rel_to_gamma(value)  # > 0 up to the float below the top (tested)


def gamma_to_sigma_rel(gamma: float) -> float:
    r""":math:`\sigma_{rel} = (\gamma+1)^{1/2} (\gamma+2)^{-1} (\gamma+3)^{-1/2}` (EDM2 eq. 4), for
    :math:`\gamma > 0` (via :func:`polyak.schedules.gamma_to_sigma_rel`)."""
    return schedules.gamma_to_sigma_rel(_check_gamma(gamma, "gamma"))


def _check_gamma(gamma: Any, name: str) -> float:
    value = _check_real(gamma, name)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"{name} must be a finite number > 0 for post-hoc EMA (sigma_rel in (0, "
            f"{SIGMA_REL_MAX:.4f})), got {name}={gamma!r}; e.g. gamma=6.94 is sigma_rel=0.10."
        )
    return value


# ---------------------------------------------------------------------------- the least squares


def profile_inner(t_a: Any, gamma_a: Any, t_b: Any, gamma_b: Any) -> np.ndarray:
    r""":math:`\langle p_a, p_b\rangle = \int_0^\infty p_{t_a,\gamma_a}(\tau)\, p_{t_b,\gamma_b}(\tau)\,
    d\tau` of two power-function profiles :math:`p_{t,\gamma}(\tau) = (\gamma+1)\tau^\gamma /
    t^{\gamma+1}` on :math:`0 < \tau \le t` (EDM2 eq. 151), broadcast over the arguments, float64:

    .. math::

        \frac{(\gamma_a+1)(\gamma_b+1)}{\gamma_a+\gamma_b+1}\,
        \frac{\min(t_a,t_b)^{\gamma_a+\gamma_b+1}}{t_a^{\gamma_a+1} t_b^{\gamma_b+1}}
        = \frac{(\gamma_a+1)(\gamma_b+1)}{\gamma_a+\gamma_b+1}\,
        \frac{(t_{\min}/t_{\max})^{\gamma_{\max}}}{t_{\max}},

    where :math:`\gamma_{\max}` is the exponent of the profile that ends later. The second form is
    the one computed: it cannot overflow when ``t`` counts samples (``t ** 35`` would).
    """
    t_a, g_a, t_b, g_b = np.broadcast_arrays(
        *(np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    )
    t_max = np.maximum(t_a, t_b)
    exponent = np.where(t_a <= t_b, g_b, g_a)
    scale = (g_a + 1) * (g_b + 1) / (g_a + g_b + 1)
    return scale * (np.minimum(t_a, t_b) / t_max) ** exponent / t_max


def _vector(values: Any, name: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a sequence of numbers, got {name}={values!r}.") from error
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-d sequence, got shape {array.shape}: {name}={values!r}."
        )
    return array


def solve_weights(
    snapshot_ts: Sequence[float],
    snapshot_gammas: Sequence[float],
    target_ts: Sequence[float],
    target_gammas: Sequence[float],
) -> np.ndarray:
    r"""The weights that rebuild each target power EMA from the snapshots, float64, shape
    ``(len(snapshot_ts), len(target_ts))``: column ``j`` holds :math:`w` with
    :math:`\sum_i w_i \hat\theta_i \approx` the EMA of exponent ``target_gammas[j]`` at time
    ``target_ts[j]``.

    EDM2's least-squares projection (App. C.3, Algorithm 3): :math:`A w = b` with the Gram matrix
    :math:`A_{ij} = \langle p_i, p_j\rangle` of the snapshot profiles and
    :math:`b_i = \langle p_i, p\rangle` (:func:`profile_inner`). The system is solved by
    ``np.linalg.lstsq`` after scaling each profile to unit norm (the raw diagonal spans the
    factor :math:`1/t`), so duplicate or nearly dependent snapshots give the least-norm weights
    instead of an error. Each column is then divided by its sum, so the weights sum to 1 and a
    constant run rebuilds to that constant. Times are in one unit, steps or samples, > 0; the
    target may lie anywhere (also past the last snapshot, where the fit is poor).
    """
    ts, gs = _vector(snapshot_ts, "snapshot_ts"), _vector(snapshot_gammas, "snapshot_gammas")
    tt, gt = _vector(target_ts, "target_ts"), _vector(target_gammas, "target_gammas")
    for (a, name_a), (b, name_b) in (
        ((ts, "snapshot_ts"), (gs, "snapshot_gammas")),
        ((tt, "target_ts"), (gt, "target_gammas")),
    ):
        if a.shape != b.shape:
            raise ValueError(
                f"{name_a} and {name_b} must have the same length, got {a.size} and {b.size}."
            )
    for values, name in ((ts, "snapshot_ts"), (tt, "target_ts")):
        if not np.all(np.isfinite(values) & (values > 0)):
            raise ValueError(f"{name} must be finite times > 0 (steps or samples), got {values}.")
    for values, name in ((gs, "snapshot_gammas"), (gt, "target_gammas")):
        if not np.all(np.isfinite(values) & (values > 0)):
            raise ValueError(
                f"{name} must be finite exponents > 0 (sigma_rel in (0, {SIGMA_REL_MAX:.4f})), "
                f"got {values}; convert with sigma_rel_to_gamma."
            )
    gram = profile_inner(ts[:, None], gs[:, None], ts[None, :], gs[None, :])
    cross = profile_inner(ts[:, None], gs[:, None], tt[None, :], gt[None, :])
    scale = 1 / np.sqrt(np.diag(gram))
    scaled, *_ = np.linalg.lstsq(gram * np.outer(scale, scale), cross * scale[:, None], rcond=None)
    weights = scaled * scale[:, None]
    totals = weights.sum(axis=0)
    bad = ~np.isfinite(totals) | (np.abs(totals) < 1e-9)
    if np.any(bad):
        raise ValueError(
            f"the snapshots cannot represent the targets (t, gamma) = "
            f"{list(zip(tt[bad].tolist(), gt[bad].tolist(), strict=True))}: their weights sum to "
            f"{totals[bad].tolist()}; choose a target time within the snapshots' times."
        )
    return weights / totals


# ---------------------------------------------------------------------------- the files


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One snapshot file: the power EMA of exponent ``gamma`` after ``step`` optimizer steps
    (``samples`` samples seen, ``None`` when not recorded), stored at ``path``."""

    path: Path
    step: int
    gamma: float
    samples: int | None = None

    @property
    def sigma_rel(self) -> float:
        return gamma_to_sigma_rel(self.gamma)

    def time(self, time: str = "steps") -> int:
        """The snapshot's time on the axis ``time`` ("steps" or "samples")."""
        if time not in _TIMES:
            raise ValueError(f"time must be one of {_TIMES}, got time={time!r}.")
        value = self.step if time == "steps" else self.samples
        if value is None:
            raise ValueError(
                f"snapshot {self.path.name} recorded no samples, so time='samples' cannot be "
                f"used; pass time='steps', or record samples when writing snapshots."
            )
        return value


def _check_count(value: Any, name: str, *, optional: bool = False) -> int | None:
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise (ValueError if isinstance(value, numbers.Integral) else TypeError)(
            f"{name} must be an int >= 1{' or None' if optional else ''}, got {name}={value!r}."
        )
    return int(value)


def _file_name(step: int, sigma_rel: float) -> str:
    return f"{step:010d}-sigma_rel-{sigma_rel:.4f}.safetensors"


def _index_entry(snap: Snapshot) -> dict[str, Any]:
    return {
        "file": snap.path.name,
        "step": snap.step,
        "samples": snap.samples,
        "gamma": snap.gamma,
        "sigma_rel": snap.sigma_rel,
    }


def _snapshot_fp32(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` on the CPU, floating ones as float32; names that share a tensor still do."""
    if not isinstance(tensors, Mapping) or not tensors:
        raise TypeError(
            f"tensors must be a non-empty mapping of names to tensors (a state dict), got "
            f"{type(tensors).__name__} {tensors!r:.80}."
        )
    converted: dict[tuple[Any, ...], torch.Tensor] = {}
    out = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"tensors must map str names to tensors, got {name!r}: {type(tensor).__name__}."
            )
        if tensor.is_complex():
            raise TypeError(
                f"tensor {name!r} is {tensor.dtype}; post-hoc snapshots hold real floating "
                f"tensors (averaged) and integer or bool tensors (copied)."
            )
        key = (
            tensor.device,
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if key not in converted:
            dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
            converted[key] = tensor.detach().to("cpu", dtype)
        out[name] = converted[key]
    return out


def write_snapshot(
    snapshot_dir: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    *,
    step: int,
    gamma: float,
    samples: int | None = None,
) -> Path:
    """Store ``tensors`` (the power EMA of exponent ``gamma`` after ``step`` optimizer steps, a full
    state dict) as a snapshot in ``snapshot_dir``, and list it in the directory's index.

    Floating tensors are written as float32, integer and bool tensors as they are. The file is
    written atomically, then the whole index is rewritten atomically (see the module docstring for
    the format). A second snapshot with the same ``step`` and ``gamma`` replaces the first (a run
    resumed from a checkpoint repeats steps). ``samples``, if given, is the number of training
    samples seen at ``step``: it lets :func:`reconstruct` use ``time="samples"``. Returns the file.
    """
    step = _check_count(step, "step")
    samples = _check_count(samples, "samples", optional=True)
    gamma = _check_gamma(gamma, "gamma")
    directory = Path(snapshot_dir)
    snaps = _read_entries(directory) if (directory / INDEX).exists() else []
    snap = Snapshot(directory / _file_name(step, gamma_to_sigma_rel(gamma)), step, gamma, samples)
    for other in snaps:
        if other.path == snap.path and other.gamma != gamma:
            raise ValueError(
                f"snapshot file {snap.path.name} is already taken by gamma={other.gamma!r}, and "
                f"gamma={gamma!r} would reuse it: the two sigma_rel agree to 4 decimals; track "
                f"sigma_rel values that differ by at least 1e-4."
            )
        if other.step == step and other.samples != samples:
            raise ValueError(
                f"step {step} already has a snapshot with samples={other.samples!r} "
                f"({other.path.name}), this one has samples={samples!r}; all snapshots of a "
                f"step must record the same samples."
            )
    metadata = {
        "format": "pt",
        "polyak.format": FORMAT,
        "polyak.version": str(VERSION),
        "polyak.step": str(step),
        "polyak.gamma": repr(gamma),
        "polyak.sigma_rel": repr(snap.sigma_rel),
    }
    if samples is not None:
        metadata["polyak.samples"] = str(samples)
    save_safetensors(_snapshot_fp32(tensors), snap.path, metadata)
    snaps = [s for s in snaps if (s.step, s.gamma) != (step, gamma)] + [snap]
    snaps.sort(key=lambda s: (s.step, s.gamma))
    index = {"format": FORMAT, "version": VERSION, "snapshots": [_index_entry(s) for s in snaps]}
    with atomic_path(directory / INDEX) as tmp:
        tmp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return snap.path


def _corrupt(path: Path, what: str) -> ValueError:
    return ValueError(
        f"post-hoc index {path} is corrupt: {what}. Expected the index.json that "
        f"polyak.posthoc.write_snapshot writes (format {FORMAT!r}, version {VERSION})."
    )


def _read_entries(directory: Path) -> list[Snapshot]:
    """The snapshots ``index.json`` lists, validated as data (the files are not looked at)."""
    path = directory / INDEX
    if not directory.is_dir():
        raise FileNotFoundError(
            f"snapshot directory {directory} does not exist; pass the snapshot_dir that "
            f"training wrote its post-hoc snapshots to."
        )
    if not path.is_file():
        found = sorted(p.name for p in directory.glob("*.safetensors"))
        raise FileNotFoundError(
            f"no {INDEX} in {directory}: not a post-hoc snapshot directory "
            + (
                f"(it holds {len(found)} .safetensors files, e.g. {found[0]}, but no index; "
                f"were they written by polyak.posthoc.write_snapshot?)."
                if found
                else "(it holds no snapshots); pass the snapshot_dir that training wrote to."
            )
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _corrupt(path, f"it is not valid JSON ({error})") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        got = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise _corrupt(path, f"its format is {got!r}, not {FORMAT!r}")
    version = index.get("version")
    if version != VERSION:
        newer = isinstance(version, int) and version > VERSION
        raise _corrupt(
            path,
            f"its version is {version!r}"
            + ("; it was written by a newer polyak: upgrade polyak to read it" if newer else ""),
        )
    entries = index.get("snapshots")
    if not isinstance(entries, list):
        raise _corrupt(path, f"'snapshots' is {type(entries).__name__}, not a list")
    keys = {"file", "step", "samples", "gamma", "sigma_rel"}
    snaps: list[Snapshot] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != keys:
            raise _corrupt(path, f"entry {i} is {entry!r}, expected the keys {sorted(keys)}")
        file = entry["file"]
        if not isinstance(file, str) or Path(file).name != file or not file:
            raise _corrupt(path, f"entry {i} names the file {file!r}, not a file name")
        try:
            snap = Snapshot(
                directory / file,
                _check_count(entry["step"], "step"),
                _check_gamma(entry["gamma"], "gamma"),
                _check_count(entry["samples"], "samples", optional=True),
            )
        except (TypeError, ValueError) as error:
            raise _corrupt(path, f"entry {i} ({file}): {error}") from error
        sigma_rel = entry["sigma_rel"]
        if not (
            isinstance(sigma_rel, (int, float))
            and math.isclose(sigma_rel, snap.sigma_rel, rel_tol=1e-9)
        ):
            raise _corrupt(
                path,
                f"entry {i} ({file}) has sigma_rel={sigma_rel!r} but gamma="
                f"{snap.gamma!r}, which is sigma_rel={snap.sigma_rel!r}",
            )
        snaps.append(snap)
    seen: dict[Any, Snapshot] = {}
    for snap in snaps:
        for key in ((snap.step, snap.gamma), snap.path):
            if key in seen:
                raise _corrupt(path, f"{snap.path.name} and {seen[key].path.name} collide")
            seen[key] = snap
    recorded = sorted({(s.step, s.samples) for s in snaps if s.samples is not None})
    for (step_a, samples_a), (step_b, samples_b) in itertools.pairwise(recorded):
        if not samples_a < samples_b:
            raise _corrupt(
                path,
                f"step {step_a} has samples={samples_a} and step {step_b} has samples="
                f"{samples_b}: samples must grow with the steps, one count per step",
            )
    return sorted(snaps, key=lambda s: (s.step, s.gamma))


def _header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header, read with plain file I/O (no tensor is loaded)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise ValueError(
                f"snapshot {path} is not a safetensors file: it is {size} bytes long and its "
                f"first 8 bytes claim a header of {length} bytes (truncated, or not a snapshot)."
            )
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"snapshot {path} has a corrupt safetensors header: {error}"
            ) from error
    if not isinstance(header, dict):
        raise ValueError(f"snapshot {path} has a corrupt safetensors header: {header!r:.80}")
    return header


def _check_file(snap: Snapshot, header: Mapping[str, Any]) -> None:
    """The file's own metadata agrees with its index entry (format, version, step, gamma)."""
    meta = header.get("__metadata__") or {}
    expected = {
        "polyak.format": FORMAT,
        "polyak.version": str(VERSION),
        "polyak.step": str(snap.step),
        "polyak.gamma": repr(snap.gamma),
        "polyak.samples": None if snap.samples is None else str(snap.samples),
    }
    wrong = {key: meta.get(key) for key, value in expected.items() if meta.get(key) != value}
    if wrong:
        raise ValueError(
            f"snapshot {snap.path} does not match its index entry (step={snap.step}, "
            f"gamma={snap.gamma!r}, samples={snap.samples!r}, format {FORMAT!r} version "
            f"{VERSION}): its metadata has {wrong}. The directory mixes files of other runs or "
            f"formats; keep one run's snapshots per directory."
        )


def read_index(snapshot_dir: str | os.PathLike[str]) -> list[Snapshot]:
    """The snapshots of ``snapshot_dir``, sorted by (step, gamma), after checking that the index
    is valid, every file it lists exists, and each file's metadata agrees with its entry.

    Raises ``FileNotFoundError`` for a missing directory, index or file, ``ValueError`` for a
    corrupt index or a file of another format or run.
    """
    snaps = _read_entries(Path(snapshot_dir))
    missing = [s.path.name for s in snaps if not s.path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} snapshot files listed in {Path(snapshot_dir) / INDEX} are missing: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}; restore them, or rebuild the "
            f"index without them."
        )
    for snap in snaps:
        _check_file(snap, _header(snap.path))
    return snaps


# ---------------------------------------------------------------------------- reconstruction


def _layout(
    snaps: Sequence[Snapshot],
) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """The tensors (name -> (dtype, shape)) and aliases every snapshot holds; all must agree."""
    layouts = []
    for snap in snaps:
        header = _header(snap.path)
        tensors = {
            name: (info["dtype"], tuple(info["shape"]))
            for name, info in header.items()
            if name != "__metadata__"
        }
        aliases = json.loads((header.get("__metadata__") or {}).get(ALIASES_KEY, "{}"))
        layouts.append((tensors, aliases))
    first_tensors, first_aliases = layouts[0]
    for snap, (tensors, aliases) in zip(snaps, layouts, strict=True):
        if tensors != first_tensors or aliases != first_aliases:
            diff = {name for name, _ in set(tensors.items()) ^ set(first_tensors.items())}
            diff |= {name for name, _ in set(aliases.items()) ^ set(first_aliases.items())}
            raise ValueError(
                f"snapshot {snap.path.name} holds other tensors than {snaps[0].path.name} (they "
                f"differ in {sorted(diff)[:10]}): the snapshots of one reconstruction must come "
                f"from one model, written by one polyak version."
            )
    return first_tensors, first_aliases


def _used(snaps: list[Snapshot], at: Any, directory: Path) -> list[Snapshot]:
    steps = sorted({s.step for s in snaps})
    if at is None:
        at = steps[-1]
    if isinstance(at, bool) or not isinstance(at, numbers.Integral) or at not in steps:
        shown = (
            str(steps)
            if len(steps) <= 20
            else f"[{', '.join(map(str, steps[:10]))}, ..., {', '.join(map(str, steps[-10:]))}]"
        )
        raise ValueError(
            f"at must be a step at which {directory} holds snapshots, got at={at!r}; the "
            f"{len(steps)} snapshot steps are {shown}. Pass one of them, or at=None for the "
            f"last ({steps[-1]})."
        )
    return [s for s in snaps if s.step <= at]


def reconstruct(
    snapshot_dir: str | os.PathLike[str],
    sigma_rel: float | Sequence[float],
    at: int | None = None,
    *,
    time: str = "steps",
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
    r"""The power-function EMA of relative width ``sigma_rel`` at optimizer step ``at``, rebuilt
    from the snapshots in ``snapshot_dir``: :math:`\sum_i w_i \hat\theta_i` with the weights of
    :func:`solve_weights` (EDM2 App. C.3; the weights sum to 1).

    ``at`` must be a step that has snapshots (default: the last); snapshots after it are ignored,
    so ``at`` gives the post-hoc EMA as it would have been at that point of training.
    ``time="samples"`` measures the profiles in samples seen instead of optimizer steps (every
    snapshot up to ``at`` must have recorded ``samples``), which is the right axis when the batch
    size changed during training.

    Returns a state dict (float32 floating tensors on ``device``; integer tensors such as
    ``num_batches_tracked`` from the snapshot at ``at``), loadable into a plain model; for a
    sequence of ``sigma_rel``, a list of them, one per value, all made in one pass over the files.
    The files are streamed: each is opened once and read tensor by tensor into one float32
    accumulator per ``sigma_rel``, so memory is those accumulators plus one tensor, not a model
    per snapshot.
    """
    single = isinstance(sigma_rel, numbers.Real)
    if isinstance(sigma_rel, (str, bytes)) or not (single or isinstance(sigma_rel, Iterable)):
        raise TypeError(
            f"sigma_rel must be a float or a sequence of floats, got sigma_rel={sigma_rel!r}."
        )
    sigma_rels = [sigma_rel] if single else list(sigma_rel)  # type: ignore[arg-type]
    if not sigma_rels:
        raise ValueError("sigma_rel is an empty sequence; pass at least one value, e.g. 0.10.")
    gammas = [sigma_rel_to_gamma(value) for value in sigma_rels]
    if time not in _TIMES:
        raise ValueError(f"time must be one of {_TIMES}, got time={time!r}.")
    directory = Path(snapshot_dir)
    snaps = read_index(directory)
    if not snaps:
        raise ValueError(
            f"{directory / INDEX} lists no snapshots; training has not written any yet."
        )
    used = _used(snaps, at, directory)
    latest = used[-1]  # of the snapshots at `at`, the last in (step, gamma) order
    times = [s.time(time) for s in used]
    weights = solve_weights(
        times, [s.gamma for s in used], [latest.time(time)] * len(gammas), gammas
    )
    tensors, aliases = _layout(used)
    averaged = [name for name, (dtype, _) in tensors.items() if dtype in _FLOAT_DTYPES]
    copied = [name for name in tensors if name not in averaged]
    results: list[dict[str, torch.Tensor]] = [
        {
            name: torch.zeros(tensors[name][1], dtype=torch.float32, device=device)
            for name in averaged
        }
        for _ in gammas
    ]
    from safetensors import safe_open

    for i, snap in enumerate(used):
        with safe_open(str(snap.path), framework="pt") as f:
            for name in averaged:
                tensor = f.get_tensor(name).to(device, torch.float32)
                for result, weight in zip(results, weights[i].tolist(), strict=True):
                    result[name].add_(tensor, alpha=weight)
                del tensor  # one tensor at a time besides the accumulators
            if snap is latest:
                for name in copied:
                    value = f.get_tensor(name)  # may view the whole file's buffer: copy
                    for result in results:
                        result[name] = value.to(device, copy=True)
    for result in results:
        for alias, target in aliases.items():
            result[alias] = result[target]
    return results[0] if single else results


# ---------------------------------------------------------------------------- the tracker


def _slot_name(sigma_rel: float) -> str:
    return f"sigma_rel={sigma_rel:g}"


class PowerEMA:
    r"""Power-function EMAs of one model, one per ``sigma_rel``, updated in one pass, with
    snapshots for :func:`reconstruct` (EDM2, Karras et al. 2024, Sec. 3 and App. C).

    One :class:`polyak.EMA` with one slot per ``sigma_rel``
    (:class:`polyak.averagers.Exponentials` of :func:`polyak.schedules.power` decays): every
    weight is read once per update for all of them. After ``n`` optimizer steps the average of
    exponent :math:`\gamma` is

    .. math:: \hat\theta_n = \beta_n \hat\theta_{n'} + (1 - \beta_n) \theta_n, \qquad
              \beta_n = \left(1 - \frac{n - n'}{n}\right)^{\gamma + 1},

    :math:`n'` the previous averaging update's step: with ``update_every=k`` the product of the
    per-step decays :math:`(1 - 1/m)^{\gamma+1}` over the ``k`` steps covered telescopes to exactly
    this, so the profile is EDM2's with :math:`\Delta t = k` (ema-pytorch's ``PostHocEMA``
    computes :math:`\beta` from the call count while updating every ``k`` calls, a profile of the
    wrong length). The first update copies the weights (:math:`\beta_1 = 0`).

    ``snapshot_every`` (optimizer steps) writes every average to ``snapshot_dir`` as fp32
    safetensors with step, samples, :math:`\gamma` and ``sigma_rel`` in their metadata and an
    index (:func:`write_snapshot`); a snapshot records the step of the last averaging update, the
    time its profile ends at. :meth:`close` (or leaving a ``with`` block, also on an error)
    snapshots the final state. ``batch_size`` records samples seen (``step * batch_size``) for
    ``reconstruct(..., time="samples")``. Other keyword arguments go to :class:`polyak.EMA`
    (``buffers``, ``shadow_dtype``, ``kernel``, ...).

    ``sigma_rel`` must lie in (0, sqrt(1/12)) (:math:`\gamma > 0`); EDM2 tracked 0.05 and 0.10.
    """

    def __init__(
        self,
        model: nn.Module | Iterable[tuple[str, torch.Tensor]],
        sigma_rels: Sequence[float] = (0.05, 0.10),
        *,
        snapshot_every: int | None = None,
        snapshot_dir: str | os.PathLike[str] | None = None,
        batch_size: int | None = None,
        update_every: int = 1,
        **ema_kwargs: Any,
    ) -> None:
        if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence):
            raise TypeError(
                f"sigma_rels must be a sequence of floats, got {sigma_rels!r}; e.g. "
                f"sigma_rels=(0.05, 0.10)."
            )
        gammas = tuple(sigma_rel_to_gamma(s) for s in sigma_rels)  # checks each
        names = tuple(_slot_name(float(s)) for s in sigma_rels)
        if not names or len(set(names)) != len(names):
            raise ValueError(
                f"sigma_rels must be distinct values, at least one, got {list(sigma_rels)!r}."
            )
        if snapshot_every is not None:
            _check_count(snapshot_every, "snapshot_every")
            if snapshot_dir is None:
                raise ValueError(
                    "snapshot_every needs snapshot_dir=, the directory the snapshots go to."
                )
        self.batch_size = _check_count(batch_size, "batch_size", optional=True)
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = gammas
        self.snapshot_every = snapshot_every
        self.snapshot_dir = None if snapshot_dir is None else Path(snapshot_dir)
        rule = averagers.Exponentials(tuple(schedules.Power(g) for g in gammas), names=names)
        self.ema = EMA(model, rule=rule, update_every=update_every, **ema_kwargs)
        self._snapshotted: int | None = None

    # ------------------------------------------------------------------ training

    def update(self) -> None:
        """Call once per optimizer step: update every average; snapshot every ``snapshot_every``."""
        self.ema.update()
        if self.snapshot_every is not None and self.ema.step % self.snapshot_every == 0:
            self.snapshot()

    @property
    def step(self) -> int:
        """Calls of :meth:`update` (optimizer steps)."""
        return self.ema.step

    def _averaged_step(self) -> int:
        """The step of the last averaging update: where the averages' profiles end."""
        return self.ema.num_averages * self.ema.update_every

    def snapshot(self) -> list[Path]:
        """Write every average to ``snapshot_dir`` now (once per averaging update: a second call
        before the next one writes nothing). Returns the files written."""
        if self.snapshot_dir is None:
            raise ValueError(
                "this PowerEMA has no snapshot_dir; build it with snapshot_dir=... to write "
                "snapshots."
            )
        step = self._averaged_step()
        if step == 0 or step == self._snapshotted:
            return []
        samples = None if self.batch_size is None else step * self.batch_size
        files = []
        for slot, gamma in zip(self.ema.slots, self.gammas, strict=True):
            if self.ema.model is not None:
                tensors = self.ema.export_state_dict(torch.float32, slot=slot)
            else:
                tensors = {n: self.ema.average(n, slot=slot) for n in self.ema.names()}
            files.append(
                write_snapshot(self.snapshot_dir, tensors, step=step, gamma=gamma, samples=samples)
            )
        self._snapshotted = step
        return files

    def close(self) -> None:
        """The end of training: snapshot the final state (if there is a ``snapshot_dir``)."""
        if self.snapshot_dir is not None:
            self.snapshot()

    def __enter__(self) -> PowerEMA:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ reading

    def _slot(self, sigma_rel: float | None) -> str | None:
        if sigma_rel is None:
            return None
        for value, slot in zip(self.sigma_rels, self.ema.slots, strict=True):
            if math.isclose(value, sigma_rel, rel_tol=0, abs_tol=1e-12):
                return slot
        raise ValueError(
            f"sigma_rel={sigma_rel!r} is not tracked; this PowerEMA tracks {list(self.sigma_rels)}. "
            f"Rebuild any other sigma_rel after training with polyak.posthoc.reconstruct."
        )

    def average(self, name: str, sigma_rel: float | None = None) -> torch.Tensor | None:
        """The tracked average of ``name`` for ``sigma_rel`` (default: the first tracked)."""
        return self.ema.average(name, slot=self._slot(sigma_rel))

    def swapped(
        self, model: nn.Module | None = None, *, sigma_rel: float | None = None
    ) -> contextlib.AbstractContextManager[nn.Module | None]:
        """``ema.swapped()`` with the average of ``sigma_rel`` (default: the first tracked)."""
        return self.ema.swapped(model, slot=self._slot(sigma_rel))

    def state_dict(self) -> dict[str, Any]:
        """The EMA's state (every average, exactly resumable) and the last snapshot's step."""
        return {"ema": self.ema.state_dict(), "snapshotted": self._snapshotted}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`."""
        if not isinstance(state, Mapping) or set(state) != {"ema", "snapshotted"}:
            raise ValueError(
                f"PowerEMA.load_state_dict takes the output of PowerEMA.state_dict() (keys "
                f"'ema', 'snapshotted'), got {type(state).__name__} "
                f"{sorted(map(str, state)) if isinstance(state, Mapping) else ''}."
            )
        snapshotted = state["snapshotted"]
        if snapshotted is not None:
            _check_count(snapshotted, "snapshotted")
        self.ema.load_state_dict(state["ema"])
        self._snapshotted = snapshotted

    def __repr__(self) -> str:
        return (
            f"PowerEMA(sigma_rels={list(self.sigma_rels)}, step={self.step}, "
            f"snapshot_every={self.snapshot_every}, snapshot_dir={self.snapshot_dir})"
        )
