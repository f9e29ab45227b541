"""LAWA: the uniform average of the latest K checkpoints (Kaddour 2022; Sanyal et al. 2023)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from polyak.averagers._ops import HOST, Ops
from polyak.averagers._rule import Rule, _check_keys
from polyak.averagers._values import assign, is_bool, load_int

T = TypeVar("T")


@dataclasses.dataclass(eq=False)
class LAWA(Rule):
    r"""Latest weight averaging: the plain mean of the last ``k`` checkpoints.

    Kaddour 2022, "Stop Wasting My Time! Saving Days of ImageNet and BERT Training with Latest
    Weight Averaging" (the mean of the last ``k`` end-of-epoch checkpoints), and Sanyal et al.
    2023, "Early Weight Averaging meets High Learning Rates for LLM Pre-training" (checkpoints
    every :math:`\nu` steps). A checkpoint is taken at every averaging update, so :math:`\nu` is
    the EMA's ``update_every`` (steps per epoch for Kaddour's). After :math:`c` checkpoints
    :math:`\theta^{(0)}, ..., \theta^{(c-1)}`:

    .. math:: \bar\theta = \frac{1}{m} \sum_{i=c-m}^{c-1} \theta^{(i)}, \qquad m = \min(c, k).

    As a rule: ``k`` ring slots ``("lawa0", ..., "lawa{k-1}")``; the :math:`c`-th checkpoint
    (:math:`c = 0, 1, ...`) is copied into slot :math:`c \bmod k` (weight 1; every other slot
    weight 0), overwriting the oldest; :meth:`read` is the mean of the :math:`m` filled slots.
    Before the first checkpoint it reads slot 0 (the shadow the EMA starts from, the weights it
    was built with). The weights are :math:`[c \bmod k = j]` written as a comparison, so they are
    evaluated on the device too (``capturable=True``).

    State: ``{"count": c}``, the checkpoints taken (an int, or a 0-dim int64 tensor on the
    device). Where the slots are stored (on the device or off it, as the papers keep them on the
    CPU) is the EMA's business, not the rule's.
    """

    k: int
    count: Any = dataclasses.field(default=0, init=False)

    def __post_init__(self) -> None:
        if is_bool(self.k) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(
                f"LAWA(k=...) is the number of latest checkpoints averaged, an int >= 1, got "
                f"k={self.k!r}; e.g. LAWA(k=5) with update_every=steps_per_epoch (Kaddour 2022)."
            )

    @property
    def slots(self) -> tuple[str, ...]:  # type: ignore[override]
        """``("lawa0", ..., "lawa{k-1}")``: the ring of the last ``k`` checkpoints."""
        return tuple(f"lawa{j}" for j in range(self.k))

    def weights(self, first: Any, last: Any, ops: Ops = HOST) -> tuple[Any, ...]:
        """Weight 1 for slot ``count % k`` (the checkpoint is copied there), 0 for the others."""
        position = self.count % self.k
        return tuple(ops.real(position == j) for j in range(self.k))

    def advance(self, due: Any, ops: Ops = HOST) -> None:
        """``count += 1`` where ``due`` (on the device ``count += due``, in place)."""
        self.count = ops.add_(self.count, due)

    def read(self, averages: Sequence[T], current: T) -> T:
        """The mean of the ``min(count, k)`` filled slots (slot 0 alone before any checkpoint),
        summed in slot order: a new tensor. With the count on the device, the empty slots are
        selected out by ``torch.where``, not read on the host."""
        if len(averages) != self.k:
            raise ValueError(
                f"LAWA(k={self.k}).read takes the {self.k} slots' averages, got {len(averages)}."
            )
        count = self.count
        if isinstance(count, torch.Tensor):
            filled = count.clamp(min=1, max=self.k)
            total = averages[0]
            for j in range(1, self.k):
                total = total + torch.where(filled > j, averages[j], 0)  # type: ignore
            return total / filled  # type: ignore[operator]
        filled = min(max(count, 1), self.k)
        total = averages[0]
        for j in range(1, filled):
            total = total + averages[j]  # type: ignore[operator]
        return total / filled  # type: ignore[operator]

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take ``{"count": c}``, ``c`` an int >= 0 (or a 0-dim integer tensor)."""
        _check_keys(self, state, ("count",))
        count = load_int(self, "count", state["count"], "the checkpoints taken so far")
        self.count = assign(self.count, count)

    def map_state(self, fn: Callable[[Any], Any]) -> None:
        self.count = fn(self.count)
