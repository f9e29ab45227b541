"""A rule's state values: Python ints on the host, 0-dim tensors beside the step on the device.

Shared by the rules that keep counts (:class:`~polyak.averagers.Uniform`,
:class:`~polyak.averagers.LAWA`) or the step of their last update
(:class:`~polyak.averagers.BEMA`): loading one with a clear error, writing it into a device
counter in place (a captured CUDA graph keeps reading the storage it was captured with), reading
it as a float64 number without a host sync, and handing the last covered step of an update from
:meth:`~polyak.averagers.Rule.weights` to :meth:`~polyak.averagers.Rule.advance`.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

__all__ = ["LastStep", "assign", "is_bool", "load_int", "real"]


def is_bool(value: Any) -> bool:
    """``value`` is a Python bool or a bool tensor (which ``operator.index`` would take as 0/1)."""
    return isinstance(value, bool) or str(getattr(value, "dtype", "")) == "torch.bool"


def load_int(rule: Any, key: str, value: Any, meaning: str) -> int:
    """``value`` as an int >= 0: an int, or a one-element integer tensor (a capturable EMA's
    state_dict); else a ``ValueError`` naming the rule, the key, the value and the fix."""
    try:
        number = None if is_bool(value) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < 0:
        name = type(rule).__name__
        raise ValueError(
            f"{name}.load_state_dict: {key} must be an int >= 0 ({meaning}), got {key}={value!r}; "
            f"pass the output of {name}.state_dict()."
        )
    return number


def assign(current: Any, number: int) -> Any:
    """``number`` in place of ``current``: written into ``current`` where it is a device counter
    (the storage a captured graph reads stays), else ``number`` itself."""
    if hasattr(current, "fill_"):
        current.fill_(number)
        return current
    return number


def real(x: Any) -> Any:
    """An int, bool or 0-dim tensor as a float64 number: a Python float on the host, a float64
    tensor on the device (never read on the host). :meth:`Ops.real` for code that gets no ops
    (a rule's ``read``)."""
    return x.to(torch.float64) if isinstance(x, torch.Tensor) else float(x)


class LastStep:
    """The last covered step of the update whose weights were just given, for ``advance``.

    :meth:`~polyak.averagers.Rule.advance` gets ``due`` but not the steps; a rule whose state
    depends on them (the step of its last update, whether it has started) notes ``last`` in
    ``weights`` and takes it in ``advance``: the EMA calls ``weights`` right before each
    ``advance`` (on the host at every averaging update, on the device at every call). On the
    device ``last`` is the EMA's step tensor itself, so a captured graph reads its current value.
    """

    def __init__(self) -> None:
        self._last: Any = None

    def note(self, last: Any) -> None:
        self._last = last

    def take(self, rule: Any) -> Any:
        last, self._last = self._last, None
        if last is None:
            name = type(rule).__name__
            raise RuntimeError(
                f"{name}.advance() was called without {name}.weights() for that update: the "
                f"rule's state depends on the step the update covers. Call weights(first, last, "
                f"ops) first, then advance(due, ops), as polyak.EMA does."
            )
        return last

    def __deepcopy__(self, memo: dict[int, Any]) -> LastStep:
        return LastStep()  # a copy of a rule starts between updates
