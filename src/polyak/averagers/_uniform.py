"""The uniform rule: the running mean of the averaged weights (SWA)."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from polyak.averagers._ops import HOST, Ops
from polyak.averagers._rule import Rule, _check_keys


@dataclasses.dataclass(eq=False)
class Uniform(Rule):
    r"""The running mean of the weights at the averaging updates: stochastic weight averaging.

    The :math:`n`-th averaging update (:math:`n = 0, 1, ...`, counted by the rule's own state
    ``count``, which starts at 0) uses the weight :math:`1 / (n + 1)`:

    .. math:: s \leftarrow s + \frac{1}{n + 1} (\theta - s), \qquad
              s_N = \frac{1}{N} \sum_{n=0}^{N-1} \theta^{(n)} \text{ after } N \text{ updates},

    so the first update replaces the starting shadow by the weights (weight 1), and the average
    is the plain mean of the weights seen at the averaging updates, as
    ``torch.optim.swa_utils.AveragedModel``'s default averaging (Izmailov et al. 2018, eq. 2).
    ``update_every=k`` averages the weights of every k-th step (SWA's once per epoch: ``k`` = steps
    per epoch); the weight does not depend on the steps covered. Start it late in training by
    building the EMA then.

    State: ``{"count": n}``, an int (a 0-dim int64 tensor on the device under
    ``capturable=True``), so a resumed run continues the mean (:meth:`state_dict`).
    """

    slots: ClassVar[tuple[str, ...]] = ("uniform",)
    count: Any = dataclasses.field(default=0, init=False)

    def weights(self, first: Any, last: Any, ops: Ops = HOST) -> tuple[Any]:
        """``(1 / (count + 1),)``, whatever the steps covered."""
        return (1.0 / ops.real(self.count + 1),)

    def advance(self, due: Any, ops: Ops = HOST) -> None:
        """``count += 1`` where ``due`` (on the device: ``count += due``, in place)."""
        self.count = ops.add_(self.count, due)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take ``{"count": n}``, ``n`` an int >= 0 (or a 0-dim integer tensor); written into the
        device counter in place where a capturable EMA keeps one."""
        _check_keys(self, state, ("count",))
        value = state["count"]
        try:  # an int, or a one-element integer tensor (a capturable EMA's state_dict)
            count = None if _is_bool(value) else operator.index(value)
        except TypeError:
            count = None
        if count is None or count < 0:
            raise ValueError(
                f"Uniform.load_state_dict: count must be an int >= 0 (the averaging updates taken "
                f"so far), got count={value!r}; pass the output of Uniform.state_dict()."
            )
        if hasattr(self.count, "fill_"):  # on the device: keep the storage a graph reads
            self.count.fill_(count)
        else:
            self.count = count

    def map_state(self, fn: Callable[[Any], Any]) -> None:
        self.count = fn(self.count)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or str(getattr(value, "dtype", "")) == "torch.bool"
