"""How an update runs. Kernels know lists of tensors, never modules or names.

A kernel turns one list of ``sources`` and N >= 1 parallel lists of shadows (slots: one average
each, e.g. two power EMAs of the same weights) into an :class:`Update` built once at construction;
``update.lerp_([w_0, ..., w_{N-1}], gate)`` then runs ``shadow += w_k * (source - shadow)`` for
every slot ``k`` and pair, unless the 0-dim bool tensor ``gate`` is ``True`` (skip the update on
the device: every shadow keeps its bits, even against NaN sources), and ``update.copy_()`` runs
``shadow.copy_(source)``. ``lerp_(w)`` with one weight is the one-slot form. The EMA picks one
kernel at init (:func:`choose`); an explicit choice wins, ``"auto"`` takes the fastest whose
preconditions hold.

- ``reference``: one tensor at a time (``Tensor.lerp_``); the definition the others are tested against.
- ``foreach``: multi-tensor ops (``torch._foreach_lerp_``) per (device, dtype) group; sources of a
  lower precision than their shadows (bf16 weights, fp32 shadows) are upcast through one persistent,
  chunked scratch buffer, so nothing is allocated per update. Several slots run chunk by chunk, so
  the later slots read each source chunk from cache.
- ``fused``: ``torch.compile`` of the per-group update: one pass that reads each source and shadow
  once and writes each shadow once (the memory floor), and the fast path for stochastic rounding
  into bf16 shadows. Compiling costs seconds (CPU: tens of seconds) at the first update.
- ``triton``: a hand-written Triton kernel, one launch per group over tables of tensor addresses:
  the same single pass and the same stochastic rounding, compiled once per dtype combination
  (no per-tensor compilation or launch). CUDA only (Triton's interpreter runs it on the CPU under
  ``TRITON_INTERPRET=1``, for tests); needs the ``triton`` package, imported only when chosen.

:class:`~polyak._kernels._engine.Engine` then decides where and when the update runs (inline, side
CUDA stream, or offloaded to the host).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from polyak._kernels._base import Update, as_slots, check_slots
from polyak._kernels._engine import Engine
from polyak._kernels._foreach import ForeachUpdate, check_device_weight, rounds_device_weight
from polyak._kernels._fused import FusedUpdate
from polyak._kernels._reference import ReferenceUpdate

__all__ = [
    "KERNELS",
    "Engine",
    "Update",
    "auto_kernel",
    "build",
    "builder",
    "choose",
    "host_gate_devices",
]

KERNELS: dict[str, type | None] = {
    "reference": ReferenceUpdate,
    "foreach": ForeachUpdate,
    "fused": FusedUpdate,
    "triton": None,  # imported on first use: triton is an optional dependency
}
ROUNDING = ("nearest", "stochastic")


def auto_kernel(
    *,
    device_types: set[str],
    dtypes: set[torch.dtype],
    rounding: str = "nearest",
    capturable: bool = False,
    triton_fits: bool = False,
) -> str:
    """The rule behind ``kernel="auto"``, as a pure function of what it looks at.

    - CUDA shadows, where the Triton kernel fits (``triton`` installed, every shadow a supported
      dtype, each tensor dense and laid out like its shadow): ``triton``. Measured on an H200
      (bench/results/update_speed_cuda_2026-12-04_*.json): 1.05x the copy floor on a 1.31B fp32
      model against 1.16x for ``foreach``; 1.14x against 2.17x with bf16 weights and fp32 shadows;
      equal to ``foreach`` on ResNet-50 (0.109 against 0.108 ms, inside the noise); its first
      update, compilation included, took 0.7 s on the 1.31B model and 0.5 s on ResNet-50. ``fused``
      did not finish its first update within 45 s on the 1.31B model (it compiles per tensor), so
      ``auto`` never takes it on CUDA: a default that compiles for minutes is a bug. Stochastic
      rounding and capturable bf16/fp16 updates take ``triton`` too (the same kernel: it reads the
      device weight in fp32 and rounds with the same random stream as ``fused``).
    - Everywhere else: ``foreach`` (ATen's multi-tensor lerp, no compilation), except where only
      ``fused`` is right: stochastic rounding (no multi-tensor op rounds stochastically) and
      capturable updates of bf16/fp16 shadows (a multi-tensor lerp rounds a device weight to the
      shadow's dtype, see ``compute_dtype``).
    """
    if device_types == {"cuda"} and triton_fits:
        return "triton"
    if rounding == "stochastic" or (capturable and rounds_device_weight(dtypes)):
        return "fused"
    return "foreach"


def choose(
    requested: str,
    tensors: Sequence[torch.Tensor],
    rounding: str = "nearest",
    *,
    capturable: bool = False,
    sources: Sequence[torch.Tensor] | None = None,
) -> str:
    """The kernel to use: ``requested`` if it is a known name, else :func:`auto_kernel`'s pick.

    ``tensors`` are the shadows, ``sources`` the tensors they average (the shadows again where not
    given): the Triton kernel needs each pair laid out alike.
    """
    if rounding not in ROUNDING:
        raise ValueError(f"rounding must be one of {ROUNDING}, got rounding={rounding!r}.")
    dtypes = {t.dtype for t in tensors}
    if requested == "auto":
        device_types = {t.device.type for t in tensors}
        fits = device_types == {"cuda"} and _triton_fits(tensors, sources or tensors)
        return auto_kernel(
            device_types=device_types,
            dtypes=dtypes,
            rounding=rounding,
            capturable=capturable,
            triton_fits=fits,
        )
    if requested not in KERNELS:
        raise ValueError(f"unknown kernel {requested!r}; expected one of {['auto', *KERNELS]}.")
    if rounding == "stochastic" and requested == "foreach":
        raise ValueError(
            "kernel='foreach' cannot round stochastically (no multi-tensor op does it); use "
            "kernel='fused' or 'auto' (or 'reference' for the slow per-tensor definition)."
        )
    if capturable and requested == "foreach":
        check_device_weight(dtypes)
    if requested == "triton":
        if not _has_triton():
            raise ValueError(
                "kernel='triton' needs the triton package, which is not installed; "
                "`pip install triton` (Linux, CUDA), or use kernel='auto'."
            )
        from polyak._kernels._triton import check_applicable

        check_applicable(list(tensors), list(sources or tensors))
    return requested


def _triton_fits(shadows: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> bool:
    """Whether the Triton kernel is installed and runs on these pairs (see ``check_applicable``)."""
    if not shadows or not _has_triton():
        return False
    from polyak._kernels._triton import check_applicable

    try:
        check_applicable(list(shadows), list(sources))
    except ValueError:
        return False
    return True


@functools.cache
def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def build(
    kernel: str,
    shadows: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]],
    sources: Sequence[torch.Tensor],
    *,
    rounding: str = "nearest",
    seed: int = 0,
    positions: Sequence[tuple[int, int]] | None = None,
) -> Update:
    """Plan the update of ``shadows`` from ``sources`` with the named kernel.

    ``shadows``: one slot's shadows (a list of tensors, one per source) or N slots' (a list of N
    such lists, :func:`~polyak._kernels._base.as_slots`); ``update.lerp_([w_0, ..., w_{N-1}])``
    then averages ``sources`` into every slot in one update. ``positions``: where each shadow's
    elements sit in its full tensor when the shadows are shards, ``(full numel, start)``, which
    places stochastic rounding's random stream (:func:`~polyak._kernels._stochastic.stream_offsets`).
    """
    if kernel == "triton" and KERNELS["triton"] is None:
        from polyak._kernels._triton import TritonUpdate

        KERNELS["triton"] = TritonUpdate
    slots = as_slots(shadows)
    check_slots(slots, sources)
    stochastic = rounding == "stochastic"
    return KERNELS[kernel](
        slots, list(sources), stochastic=stochastic, seed=seed, positions=positions
    )


def host_gate_devices() -> frozenset[str]:
    """The device types whose gate the kernels read on the host (a CPU tensor: no sync), read at
    each call so that tests can make the CPU play a device (``_foreach.HOST_GATE_DEVICES``)."""
    from polyak._kernels import _foreach

    return _foreach.HOST_GATE_DEVICES


def builder(
    kernel: str,
    *,
    rounding: str = "nearest",
    seed: int = 0,
    positions: Sequence[tuple[int, int]] | None = None,
) -> Callable[[list[torch.Tensor], list[torch.Tensor]], Update]:
    """``build`` with the kernel and rounding fixed: what :class:`Engine` calls per tensor set."""
    return functools.partial(build, kernel, rounding=rounding, seed=seed, positions=positions)
