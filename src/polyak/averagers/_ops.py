"""The arithmetic a rule's weights are written in, on the host and on the device.

A rule (:mod:`polyak.averagers._rule`) writes its weight formula once, over an ``ops`` argument,
and the EMA evaluates that one definition in two places:

- :data:`HOST` (the default, every update of a non-capturable EMA): steps and counts are Python
  ints, weights Python floats; no tensor is made, nothing waits for the device.
- :class:`DeviceOps` (``capturable=True``): steps and counts are 0-dim int64 tensors on the
  device, weights 0-dim float64 tensors; torch ops only, never read on the host, so the update can
  be captured in a CUDA graph.

Both evaluate the same operations in the same order (the product over the covered steps runs
first to last on both), so where the arithmetic is correctly rounded (``+ - * /``, ``min``) the
two paths give the same float64 bits on the CPU. A schedule using ``**`` may differ by an ulp where
torch's ``pow`` differs from the C library's, and on CUDA, with ``update_every > 1``, the product
by a few ulps (CUDA's cumprod scans in parallel).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

__all__ = ["HOST", "DeviceOps", "HostOps", "Ops"]


class Ops(Protocol):
    """The vocabulary a rule's formulas use, so that one definition runs on the host and device.

    ``first``/``last`` are the first and last optimizer steps an averaging update covers
    (``last - first + 1 == update_every``); ``x``/``y`` are a rule's counts or weights.
    """

    def map(
        self,
        fn: Callable[[Any], Any],
        first: Any,
        last: Any,
        check: Callable[[Any, int], None] | None = None,
    ) -> Any:
        """``fn(n)`` for ``n = first, ..., last``, in order (``check(value, n)`` on the host)."""
        ...

    def prod(self, values: Any) -> Any:
        """The product of ``values`` taken first to last: ``((1 * v_0) * v_1) * ...``."""
        ...

    def real(self, x: Any) -> Any:
        """``x`` (an int count) as a float64 number."""
        ...

    def add_(self, x: Any, y: Any) -> Any:
        """``x + y``: a new int on the host, written into ``x`` on the device (a captured graph
        keeps reading the storage it was captured with); the caller stores the result."""
        ...


class HostOps:
    """Python ints and floats: no tensor is made, no device is waited for."""

    def map(
        self,
        fn: Callable[[Any], Any],
        first: Any,
        last: Any,
        check: Callable[[Any, int], None] | None = None,
    ) -> list[Any]:
        values = []
        for step in range(first, last + 1):
            value = fn(step)
            if check is not None:
                check(value, step)
            values.append(value)
        return values

    def prod(self, values: Iterable[Any]) -> Any:
        product = 1.0
        for value in values:
            product *= value
        return product

    def real(self, x: Any) -> float:
        return float(x)

    def add_(self, x: Any, y: Any) -> Any:
        return x + y

    def __repr__(self) -> str:
        return "HOST"


HOST = HostOps()


class DeviceOps:
    """0-dim tensors on one device, torch ops only: nothing is read on the host.

    ``covered`` is ``[k-1, ..., 1, 0]`` (int64, on the device; ``k = update_every``): the covered
    steps are ``last - covered``, a shape fixed at construction as a CUDA graph needs (``first``
    is ``last - k + 1`` by construction and is not read). A capturable EMA evaluates the weights at
    every call, also off the k-th steps, where some covered steps are not steps yet (``n <= 0``)
    and a schedule may give inf or NaN: such steps are evaluated at 1 instead. ``check`` is not
    run: a device value cannot be checked without a host sync (built-in schedules check their
    parameters when built).
    """

    def __init__(self, covered: torch.Tensor) -> None:
        self.covered = covered

    def map(
        self,
        fn: Callable[[Any], Any],
        first: Any,
        last: torch.Tensor,
        check: Callable[[Any, int], None] | None = None,
    ) -> torch.Tensor:
        steps = (last - self.covered).clamp_(min=1).to(torch.float64)
        values = fn(steps)
        if not isinstance(values, torch.Tensor):  # e.g. a constant schedule returns a float
            values = torch.full_like(steps, float(values))
        return values

    def prod(self, values: torch.Tensor) -> torch.Tensor:
        # on the CPU cumprod runs first to last, as the host's loop does (prod reduces in vector
        # lanes from 16 elements on, its order the CPU's vector width's business); 1 * v_0 is v_0
        return torch.cumprod(values, 0)[-1]

    def real(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float64)

    def add_(self, x: torch.Tensor, y: Any) -> torch.Tensor:
        return x.add_(y)

    def __repr__(self) -> str:
        return f"DeviceOps(update_every={self.covered.numel()}, device={self.covered.device})"


def place_state(value: Any, device: torch.device | str) -> torch.Tensor:
    """A rule's state value on ``device``: an int as int64, a float as float64, a tensor moved.

    For :meth:`Rule.map_state`, when a capturable EMA keeps a rule's state beside its step counter.
    """
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"a rule's state holds ints, floats or tensors, got {value!r} of type "
            f"{type(value).__name__}; fix the rule's state_dict()."
        )
    dtype = torch.int64 if isinstance(value, int) else torch.float64
    return torch.tensor(value, dtype=dtype, device=device)
