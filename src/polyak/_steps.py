"""Counting an EMA's updates and asking its rule for each update's weights: on the host, or on the
device so that ``update()`` can be captured in a CUDA graph.

``step`` counts calls of ``update()`` and is incremented *before* the rule is asked, so the first
update sees ``step == 1``; ``num_averages`` counts averaging updates, the calls whose step is a
multiple of ``update_every = k``. The averaging update at step ``n`` covers steps ``n-k+1 .. n``,
and the rule's weights are those of that range (:meth:`polyak.averagers.Rule.weights`).

- :class:`HostSteps` keeps Python ints: :meth:`HostSteps.tick` gives the rule's weights (floats)
  on an averaging call and ``None`` otherwise; :meth:`HostSteps.averaged`, called once the update
  has run, advances the rule and counts it (an update that raised counts nothing).
- :class:`DeviceSteps` (``capturable=True``) keeps 0-dim int64 tensors beside the tracked tensors,
  and the rule's own state there too: :meth:`DeviceSteps.tick` runs at every call without a host
  sync and gives the weights (0-dim float64 tensors, :class:`polyak.averagers.DeviceOps`) and the
  gate, True where the call is not an averaging update, so the kernel skips it on the device; the
  rule advances where due. Reading ``step`` or ``num_averages`` syncs.

A rule that writes its average back into the weights (``switches``, Switch-EMA) is asked after
the update: :meth:`HostSteps.switches` on an averaging call, :meth:`DeviceSteps.switch_gate` at
every call (a gate, as for the kernel).
"""

from __future__ import annotations

from typing import Any

import torch

from polyak.averagers import DeviceOps, Rule
from polyak.averagers._ops import place_state

__all__ = ["DeviceSteps", "HostSteps"]


class HostSteps:
    """The counters as Python ints."""

    def __init__(self) -> None:
        self.step = 0
        self.num_averages = 0

    def tick(self, rule: Rule, update_every: int) -> tuple[Any, ...] | None:
        """``step += 1``; the rule's weights if this call averages, else ``None``."""
        self.step += 1
        if self.step % update_every:
            return None
        return rule.weights(self.step - update_every + 1, self.step)

    def averaged(self, rule: Rule) -> None:
        """The averaging update ran: advance the rule and count it."""
        rule.advance(True)
        self.num_averages += 1

    def switches(self, rule: Any, update_every: int) -> bool:
        """Whether the averaging update that just ran (steps ``step-k+1 .. step``) ends by writing
        the average into the weights (``rule.switches``, :class:`polyak.averagers.SwitchEMA`)."""
        return bool(rule.switches(self.step - update_every + 1, self.step))


class DeviceSteps:
    """The counters as 0-dim int64 tensors on ``device``, where ``rule``'s state is placed too."""

    def __init__(self, device: torch.device | str, update_every: int, rule: Rule) -> None:
        self._step = torch.zeros((), dtype=torch.int64, device=device)
        self._num = torch.zeros((), dtype=torch.int64, device=device)
        self.cover(update_every)
        rule.map_state(lambda value: place_state(value, device))

    @property
    def step(self) -> int:
        return int(self._step.item())

    @step.setter
    def step(self, value: int) -> None:
        self._step.fill_(int(value))

    @property
    def device_step(self) -> torch.Tensor:
        """The step counter itself (0-dim int64 on the device), read without a sync."""
        return self._step

    @property
    def num_averages(self) -> int:
        return int(self._num.item())

    @num_averages.setter
    def num_averages(self, value: int) -> None:
        self._num.fill_(int(value))

    def cover(self, update_every: int) -> None:
        """Set ``update_every``: ``[k-1, ..., 1, 0]``, step ``n`` minus these are the ``k`` steps
        one averaging update covers."""
        self._covered = torch.arange(update_every - 1, -1, -1, device=self._step.device)

    def tick(self, rule: Rule, update_every: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """``step += 1`` on the device; the rule's weights (one 0-dim float64 tensor per slot) and
        the gate, a 0-dim bool tensor that is True where this call is not an averaging update.

        The weights are evaluated at every call, off the averaging steps too (finite there: steps
        that do not exist yet are evaluated at 1), and the rule's state advances where due.
        """
        self._step.add_(1)
        last = self._step
        ops = DeviceOps(self._covered)
        weights = rule.weights(last - (update_every - 1), last, ops)
        due = (last % update_every) == 0
        rule.advance(due, ops)
        self._num.add_(due)
        return weights, due.logical_not()

    def switch_gate(self, rule: Any, update_every: int) -> torch.Tensor:
        """After :meth:`tick`: a 0-dim bool tensor, True where this call does *not* write the
        average into the weights (not an averaging update, or ``rule.switches`` says no); on the
        device, no host sync."""
        last = self._step
        due = (last % update_every) == 0
        switch = rule.switches(last - (update_every - 1), last, DeviceOps(self._covered))
        return torch.logical_not(due & switch)

    def to(self, device: torch.device | str, rule: Rule) -> None:
        """Move the counters, and ``rule``'s state, to ``device``."""
        self._step = self._step.to(device)
        self._num = self._num.to(device)
        self._covered = self._covered.to(device)
        rule.map_state(lambda value: place_state(value, device))
