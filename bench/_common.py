"""Shared helpers for polyak's benchmark scripts; not a script itself.

Import it from a script in ``bench/`` (a script run as ``python bench/<name>.py`` has ``bench/`` on
``sys.path``, so ``import _common`` works from any working directory):

    from _common import machine_info, write_json_atomic, markdown_table, time_calls

What lives here, and nothing else:

- run metadata: :func:`machine_info`, :func:`package_versions`, :func:`git_commit`, :func:`utc_now`,
  :func:`cache_bytes`;
- load: :class:`LoadMonitor` (CPU time of other processes over a stretch of the run, from
  ``/proc/stat``), :func:`load_verdict`;
- results: :func:`write_json_atomic` (temp file, fsync, ``os.replace``), :func:`markdown_table`;
- timing: :func:`sync`, :func:`time_calls` (CUDA events on a GPU, ``perf_counter_ns`` on a CPU),
  :func:`median_iqr`, :func:`paired_ratio` (a ratio of two round-robin rows, with a bootstrap
  interval), :func:`memory_bandwidth` (the in-place ``dst.add_(src)`` / ``dst.lerp_(src, w)``
  probe behind every "floor": read two tensors, write one, as an EMA lerp does).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


# ---------------------------------------------------------------- run metadata


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def git_commit(root: Path = REPO_ROOT) -> dict[str, Any]:
    """``git rev-parse HEAD`` of the checkout and what in it differs from that commit.

    ``tree_dirty`` is true when any tracked file outside ``bench/results/`` has uncommitted changes
    or an untracked, not-ignored file exists there (``dirty_files`` lists them): the numbers were
    then measured on those edits, not on the commit alone. ``src_dirty`` / ``src_dirty_files`` are
    the same for ``src/`` alone. ``None`` where git is not available.
    """

    def _git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=20, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.rstrip("\n")

    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=all")
    files = [line[3:] for line in status.splitlines()] if status else []
    files = [f for f in files if not f.startswith("bench/results/")]
    src = [f for f in files if f.startswith("src/")]
    known = status is not None
    return {
        "commit": head,
        "tree_dirty": bool(files) if known else None,
        "dirty_files": files,
        "src_dirty": bool(src) if known else None,
        "src_dirty_files": src,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on: CPU model and cores, torch threads, GPU, versions."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "gpu_name": None,
        "gpu_memory_gib": None,
        "cuda": torch.version.cuda,
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_name"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_count"] = torch.cuda.device_count()
        info["cudnn"] = torch.backends.cudnn.version()
        info["driver"] = _nvidia_driver()
    info["triton"] = _version_of("triton")
    return info


def _version_of(package: str) -> str | None:
    """The installed version of ``package``, or ``None`` where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version as ``nvidia-smi`` reports it, or ``None`` where it cannot run."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def cache_bytes(device: str | torch.device) -> int | None:
    """Size of the last-level cache that the device's memory traffic goes through, in bytes.

    CUDA: the GPU's L2 (``L2_cache_size``). CPU: the largest ``cache/index*/size`` of cpu0 in
    sysfs (the L3 on x86; shared by the cores of one complex). ``None`` where it cannot be read.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return int(getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0)) or None
    best = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        best = size if best is None else max(best, size)
    return best


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed distribution versions (``None`` when not installed), read without importing."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------- results


def write_json_atomic(path: Path | str, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path``: temp file in the same folder, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def fmt_num(value: Any, digits: int = 3) -> str:
    """A table cell: ``-`` for None, floats to ``digits`` significant-ish places, ints with commas."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0:
            return "0"
        mag = abs(value)
        if mag >= 100:
            return f"{value:.0f}"
        if mag >= 10:
            return f"{value:.1f}"
        if mag >= 1:
            return f"{value:.2f}"
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], fmt: Callable = fmt_num
) -> str:
    """A GitHub markdown table of ``rows`` with ``columns`` given as ``(key, header)`` pairs."""
    header = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [header, sep]
    for row in rows:
        cells = [fmt(row.get(key)).replace("|", "\\|") for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- timing


def sync(device: str | torch.device) -> None:
    """Wait for queued device work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(
    fn: Callable[[], Any], device: str | torch.device, inner: int = 1, wall: bool = False
) -> float:
    """Milliseconds per call of ``fn``, from ``inner`` back-to-back calls.

    On CUDA the device is synchronized first, then CUDA events bracket the calls on the current
    stream, so the time covers both the host work (launch overhead, Python, host syncs inside
    ``fn``) and the kernels. With ``wall=True`` (CUDA), ``time.perf_counter_ns`` brackets the calls
    and a device-wide ``torch.cuda.synchronize()`` ends them instead, which also counts work ``fn``
    queued on other streams. On the CPU ``time.perf_counter_ns`` brackets the calls. Python's
    garbage collector is off while timing.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        cuda = torch.device(device).type == "cuda"
        if cuda and wall:
            torch.cuda.synchronize()
            t0 = time.perf_counter_ns()
            for _ in range(inner):
                fn()
            torch.cuda.synchronize()
            return (time.perf_counter_ns() - t0) / 1e6 / inner
        if cuda:
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / inner
        t0 = time.perf_counter_ns()
        for _ in range(inner):
            fn()
        return (time.perf_counter_ns() - t0) / 1e6 / inner
    finally:
        if gc_was_enabled:
            gc.enable()


def median_iqr(samples: Sequence[float]) -> tuple[float, float]:
    """Median and interquartile range (q75 - q25, inclusive method) of ``samples``."""
    if not samples:
        return float("nan"), float("nan")
    med = statistics.median(samples)
    if len(samples) < 2:
        return med, 0.0
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return med, q[2] - q[0]


def paired_ratio(
    a: Sequence[float],
    b: Sequence[float],
    *,
    level: float = 0.95,
    resamples: int = 4000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``median_r(a[r] / b[r])`` and a ``level`` bootstrap interval for it: ``(ratio, lo, hi)``.

    ``a[r]`` and ``b[r]`` must come from the same round r of a round-robin, so a slow phase of the
    machine that hits one hits the other; the per-round ratio cancels it where a ratio of two
    medians would not. The interval resamples whole rounds with replacement (percentile method,
    a fixed ``seed``, so a result file reproduces). Where the rows cannot be paired (different
    lengths, or a row timed once), it is the ratio of the medians with no interval (lo = hi).
    """
    if len(a) != len(b) or len(a) < 4:
        ratio = statistics.median(a) / statistics.median(b)
        return ratio, ratio, ratio
    ratios = np.asarray(a, dtype=np.float64) / np.asarray(b, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(ratios), (resamples, len(ratios)))
    medians = np.median(ratios[picks], axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(medians, [tail, 1 - tail])
    return float(np.median(ratios)), float(lo), float(hi)


# bytes moved per element of the probe's fp32 tensors: what is read plus what is written
PROBE_TRANSFERS = {"add": 3, "lerp": 3, "copy": 2}


def memory_bandwidth(
    device: str | torch.device, nbytes: int, reps: int = 10, op: str = "add"
) -> dict[str, Any]:
    """Best and median bandwidth of an fp32 memory-bound op over ``reps`` calls on ``nbytes``.

    ``op="add"``: ``dst.add_(src, alpha=0.0)`` and ``op="lerp"``: ``dst.lerp_(src, 1e-3)``, the
    in-place ops whose traffic is an EMA lerp's: read ``src``, read ``dst``, write ``dst``, so
    ``bytes moved = 3 * nbytes`` per call (``PROBE_TRANSFERS``). ``op="copy"``:
    ``dst.copy_(src)`` counted as ``2 * nbytes``, for reference only: on CPUs a copy also reads
    its destination before writing it (write-allocate), a transfer its byte count leaves out, so
    a floor from it is lower than what an in-place op can reach. ``nbytes`` must be far larger
    than the last-level cache for the result to be DRAM (HBM) bandwidth. Returns ``op``,
    ``bytes`` (one buffer), ``moved_per_call``, ``best_bytes_per_s`` and ``median_bytes_per_s``.
    """
    if op not in PROBE_TRANSFERS:
        raise ValueError(f"op must be one of {sorted(PROBE_TRANSFERS)}, got op={op!r}.")
    n = max(1, nbytes // 4)
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages, warm the path
    calls = {
        "add": lambda: dst.add_(src, alpha=0.0),  # dst unchanged: no growth, no denormals
        "lerp": lambda: dst.lerp_(src, 1e-3),
        "copy": lambda: dst.copy_(src),
    }
    fn = calls[op]
    fn()
    sync(device)
    times = [time_calls(fn, device) for _ in range(reps)]
    moved = PROBE_TRANSFERS[op] * n * 4
    return {
        "op": op,
        "bytes": float(n * 4),
        "moved_per_call": float(moved),
        "best_bytes_per_s": moved / (min(times) / 1e3),
        "median_bytes_per_s": moved / (statistics.median(times) / 1e3),
    }


# ---------------------------------------------------------------- load


def _proc_stat_busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (``/proc/stat``; steal included)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    ticks = [int(x) for x in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process, its reaped children and its live descendants.

    Descendants count as "own": torch.compile's worker processes are ours, not a foreign load.
    """
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    hz = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        entries = []
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()  # fields after "pid (comm)"
        parents[int(entry.name)] = int(rest[1])
        times[int(entry.name)] = (int(rest[11]) + int(rest[12])) / hz
    me = os.getpid()
    for pid in times:
        p, seen = pid, 0
        while p in parents and p != me and seen < 64:
            p, seen = parents[p], seen + 1
        if p == me and pid != me:
            total += times[pid]
    return total


class LoadMonitor:
    """How many cores other processes kept busy while this one ran (Linux; else ``None``).

    ``(system busy CPU seconds - this process tree's CPU seconds) / wall seconds`` over the
    stretch between :meth:`start` and :meth:`stop`. Unlike the load average, this leaves out
    the benchmark's own threads, so it can be compared with a fixed threshold.
    """

    def __init__(self) -> None:
        self._t0: float | None = None
        self._busy0: float | None = None
        self._own0 = 0.0

    def start(self) -> LoadMonitor:
        self._busy0 = _proc_stat_busy_s()
        self._own0 = _own_cpu_s() if self._busy0 is not None else 0.0
        self._t0 = time.perf_counter()
        return self

    def stop(self) -> float | None:
        """Average busy cores of other processes since :meth:`start`."""
        parts = self.stop_parts()
        return None if parts is None else foreign_cores(*parts)

    def stop_parts(self) -> tuple[float, float, float] | None:
        """``(machine busy CPU s, this process tree's CPU s, wall s)`` since :meth:`start`, for
        runs whose processes are not one tree (ranks spawned side by side each see the others as
        foreign; :func:`foreign_cores` then takes all of theirs)."""
        busy = _proc_stat_busy_s()
        if busy is None or self._busy0 is None or self._t0 is None:
            return None
        wall = time.perf_counter() - self._t0
        return busy - self._busy0, _own_cpu_s() - self._own0, wall


def foreign_cores(busy_s: float, own_s: float, wall_s: float) -> float:
    """Busy cores of other processes: ``(busy - own) / wall``, at least 0."""
    return max(0.0, (busy_s - own_s) / max(wall_s, 1e-9))


def load_threshold(cores: int | None) -> float:
    """Busy cores of other processes above which a CPU run counts as loaded: 10% of the
    cores, at least 0.5 (on 2 cores, half a core: one busy process already makes torch's
    OpenMP threads wait for each other)."""
    return max(0.5, 0.1 * (cores or 1))


def load_verdict(
    foreign_cores: Sequence[float | None], threshold: float
) -> tuple[bool | None, str]:
    """``(loaded, why)``: loaded when any measured stretch had other processes above
    ``threshold`` busy cores; ``None`` when nothing could be measured."""
    seen = [x for x in foreign_cores if x is not None]
    if not seen:
        return None, "other processes' CPU use could not be measured (no /proc/stat)"
    worst = max(seen)
    if worst > threshold:
        return True, (
            f"other processes kept {worst:.2f} cores busy (threshold {threshold:.2f}): "
            f"timings are skewed and ratios unreliable; rerun on a quiet machine"
        )
    return False, f"other processes kept at most {worst:.2f} cores busy (threshold {threshold:.2f})"


def round_orders(n: int, rounds: int, seed: str) -> list[list[int]]:
    """The order of ``n`` implementations in each of ``rounds`` rounds: a fresh shuffle per
    round from ``random.Random(seed)`` (reproducible), so no implementation always runs behind
    the same one, or first."""
    rng = random.Random(seed)
    orders = []
    for _ in range(rounds):
        order = list(range(n))
        rng.shuffle(order)
        orders.append(order)
    return orders
