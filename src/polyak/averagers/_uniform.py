"""The uniform rule: the running mean of the averaged weights (SWA), from a start step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from polyak.averagers._ops import HOST, Ops
from polyak.averagers._rule import Rule, _check_keys
from polyak.averagers._values import LastStep, assign, is_bool, load_int


@dataclasses.dataclass(eq=False, repr=False)
class Uniform(Rule):
    r"""The running mean of the weights at the averaging updates: stochastic weight averaging.

    The :math:`n`-th averaging update (:math:`n = 0, 1, ...`, counted by the rule's own state
    ``count``, which starts at 0) uses the weight :math:`1 / (n + 1)`:

    .. math:: s \leftarrow s + \frac{1}{n + 1} (\theta - s), \qquad
              s_N = \frac{1}{N} \sum_{n=0}^{N-1} \theta^{(n)} \text{ after } N \text{ updates},

    so the first update replaces the starting shadow by the weights (weight 1), and the average
    is the plain mean of the weights seen at the averaging updates, as
    ``torch.optim.swa_utils.AveragedModel``'s default averaging (Izmailov et al. 2018, "Averaging
    Weights Leads to Wider Optima and Better Generalization", eq. 2). ``update_every=k`` averages
    the weights of every k-th step (SWA's once per epoch: ``k`` = steps per epoch); the weight does
    not depend on the steps covered.

    ``start``: the optimizer step (as :attr:`polyak.EMA.step` counts, the first update is step 1)
    from which the mean runs, SWA's ``swa_start``. An averaging update whose last covered step
    :math:`b` is before it (:math:`b < \text{start}`) copies the weights (weight 1) and is not
    counted; from the first update with :math:`b \ge \text{start}` on, the shadow is the mean of
    the weights at the averaging updates since then. ``None`` (the default) counts every update,
    as ``start=0`` or ``1`` do.

    State: ``{"count": n}``, the averaging updates counted so far: an int (a 0-dim int64 tensor on
    the device under ``capturable=True``), so a resumed run continues the mean (:meth:`state_dict`).
    """

    slots: ClassVar[tuple[str, ...]] = ("uniform",)
    start: int | None = None
    count: Any = dataclasses.field(default=0, init=False)
    _last: LastStep = dataclasses.field(default_factory=LastStep, init=False, compare=False)

    def __post_init__(self) -> None:
        start = self.start
        if start is not None and (is_bool(start) or not isinstance(start, int) or start < 0):
            raise ValueError(
                f"Uniform(start=...) is the optimizer step the mean starts from, an int >= 0 or "
                f"None (every update), got start={start!r}; e.g. Uniform(start=75 * "
                f"steps_per_epoch) for SWA's swa_start=75."
            )

    def weights(self, first: Any, last: Any, ops: Ops = HOST) -> tuple[Any]:
        """``(1 / (count + 1),)`` from ``start`` on (whatever the steps covered); ``(1,)`` (a copy)
        for an update whose last covered step ``last`` is before ``start``."""
        if self.start is None:
            return (1.0 / ops.real(self.count + 1),)
        self._last.note(last)
        started = ops.real(last >= self.start)  # 1.0 from the start on, else 0.0
        return (started / ops.real(self.count + 1) + (1.0 - started),)

    def advance(self, due: Any, ops: Ops = HOST) -> None:
        """``count += 1`` where ``due`` (and, with a ``start``, the update's last step is not
        before it); on the device ``count += due``, in place."""
        if self.start is None:
            self.count = ops.add_(self.count, due)
        else:
            self.count = ops.add_(self.count, due * (self._last.take(self) >= self.start))

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take ``{"count": n}``, ``n`` an int >= 0 (or a 0-dim integer tensor); written into the
        device counter in place where a capturable EMA keeps one."""
        _check_keys(self, state, ("count",))
        count = load_int(self, "count", state["count"], "the averaging updates taken so far")
        self.count = assign(self.count, count)

    def map_state(self, fn: Callable[[Any], Any]) -> None:
        self.count = fn(self.count)

    def __repr__(self) -> str:
        start = "" if self.start is None else f"start={self.start!r}, "
        return f"Uniform({start}count={self.count!r})"
