"""The train/test switch: whether a model holds its own weights or the averages, and the way back.

Seed 001's state machine, with two ways out of idle:

- idle -> **swapped** (:meth:`Switch.swap_in`): each live tensor holds its value (re-pointed, or
  copied into an FSDP2 shard, by :mod:`polyak._placement`), what it held kept in a backup;
  :meth:`Switch.swap_out` puts that back, bit for bit. While swapped, a global optimizer pre-hook
  refuses a step on those tensors: they share storage with the values, so the step would write into
  the averages themselves.
- idle -> **stored** (:meth:`Switch.store`): the live tensors' values are copied into the backup;
  :meth:`Switch.write` then copies values in as often as wanted, and :meth:`Switch.restore` copies
  the backup back. A second ``store()`` keeps the first backup, so switching to the test weights
  twice never overwrites the trained weights with the averages.

Anything else (nesting, an update while not idle) is refused with a message that says which state
the model is in and how to leave it. :class:`ModeSwitch` ties the switch to ``model.train()`` /
``model.eval()`` (``bind_to_mode``). FSDP2 modules are resharded on the way in, before their
tensors are looked up (an unsharded root holds gathered copies), and on the way out.

Nothing here knows averaging or the EMA: callers pass the model, a function that finds its live
tensors by name (called once the model is resharded), and a function that gives the values.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from polyak import _placement
from polyak._tracking import unwrap

__all__ = ["ModeSwitch", "Switch"]

Tensors = Mapping[str, torch.Tensor]


class ModeSwitch:
    """Replaces ``model.train`` on one instance so that ``eval()`` calls ``to_averages`` and
    ``train()`` calls ``to_trained``, after the module's own method (``bind_to_mode``)."""

    def __init__(
        self, model: nn.Module, to_averages: Callable[[], None], to_trained: Callable[[], None]
    ) -> None:
        self.model = model
        self.original = model.train
        self.to_averages = to_averages
        self.to_trained = to_trained

    def __call__(self, mode: bool = True) -> nn.Module:
        result = self.original(mode)
        if mode:
            self.to_trained()
        else:
            self.to_averages()
        return result

    def __reduce__(self) -> tuple[Any, ...]:
        # a copy or pickle of the model is not bound to this switch: it gets the plain method back
        return (getattr, (self.model, "train"))  # the class's method, bound to the copy

    def remove(self) -> None:
        """Unbind: ``model.train`` is the module's own method again."""
        if self.model.__dict__.get("train") is self:
            del self.model.__dict__["train"]


def _refuse_step_into_averages(ref: weakref.ref[Switch]) -> Callable[..., None]:
    """An optimizer pre-hook, live while values are swapped in: a step on the model's tensors
    would write into the values themselves (they share storage), so it is refused."""

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        switch = ref()
        if switch is None or switch.state != "swapped" or switch.held is None:
            return
        held = {id(t) for t in switch.held.values()}
        if any(id(p) in held for group in optimizer.param_groups for p in group["params"]):
            raise RuntimeError(
                "optimizer.step() while the model holds the EMA's averages (inside "
                "ema.swapped(), after ema.use_averages(), or in model.eval() mode after "
                "ema.bind_to_mode(model)): the step would write into the averages themselves. "
                "Leave the block, call ema.use_trained(), or model.train() before stepping."
            )

    return hook


class Switch:
    """The state of one EMA's tracked model: idle (``state is None``), swapped or stored.

    ``model`` is the tracked module (``None`` for tensors given as pairs): the default target, and
    the only module :meth:`bind` accepts. While not idle, ``held`` is name -> the live tensors that
    hold the values and ``placed`` the module they belong to.
    """

    def __init__(self, model: nn.Module | None) -> None:
        self.model = model
        self.state: Literal["swapped", "stored"] | None = None
        self.backup = _placement.Backup()
        self.held: Tensors | None = None
        self.placed: nn.Module | None = None
        self.mode: ModeSwitch | None = None
        self._guard: Any = None

    def check_idle(self, action: str) -> None:
        """Refuse ``action`` unless the model holds its own weights."""
        if self.state is not None:
            swapped = self.state == "swapped"
            raise RuntimeError(
                f"cannot {action}: the averages are already in the model "
                f"({'swapped()/use_averages()' if swapped else 'store()/copy_to()'}"
                f"); nested use is not supported. Leave the first block (or call "
                f"{'use_trained()' if swapped else 'restore()'}) first."
            )

    def check_update(self) -> None:
        """Refuse an update while the model holds the averages."""
        if self.state is not None:
            where = (
                "inside ema.swapped() / use_averages()"
                if self.state == "swapped"
                else "between ema.store() and ema.restore()"
            )
            raise RuntimeError(
                f"ema.update() called {where}: the model holds the averages, and updating would "
                f"average the averages with themselves. Leave the block (or call ema.restore() / "
                f"ema.use_trained(), or model.train() after bind_to_mode) before updating."
            )

    def _target(self, model: nn.Module | None) -> nn.Module | None:
        return unwrap(model) if model is not None else self.model

    def _enter(self, model: nn.Module | None, find: Callable[[], Tensors]) -> Tensors:
        """The tensors the values go into, found once FSDP2 modules are resharded."""
        placed = self._target(model)
        _placement.reshard(placed)
        targets = find()
        self.placed = placed
        return targets

    def _leave(self) -> None:
        """Back to idle: the model's own values are in it, and FSDP2 drops any gathered values."""
        _placement.take_back(self.backup)
        _placement.reshard(self.placed)
        self.held = self.placed = None
        self.state = None

    def swap_in(
        self, model: nn.Module | None, find: Callable[[], Tensors], values: Callable[[], Tensors]
    ) -> None:
        """Idle -> swapped: ``model``'s tensors (``find()``) hold ``values()`` (by name), and an
        optimizer step on them is refused until :meth:`swap_out`. The caller checks idleness."""
        targets = self._enter(model, find)
        # zero-copy for plain tensors of the values' dtype (they view the values); cast copies
        # for others; FSDP2 shards get the values copied in, their own kept aside
        _placement.put([(targets[n], v) for n, v in values().items()], self.backup)
        self.held = targets
        self.state = "swapped"
        self._guard = register_optimizer_step_pre_hook(
            _refuse_step_into_averages(weakref.ref(self))
        )

    def swap_out(self) -> None:
        """Swapped -> idle: the model's own tensors back, bit for bit."""
        self._leave()
        self._guard.remove()
        self._guard = None

    def store(self, model: nn.Module | None, find: Callable[[], Tensors]) -> None:
        """Idle -> stored: back up what ``model``'s tensors hold; a no-op if already stored."""
        if self.state == "stored":
            return
        self.check_idle("store()")
        targets = self._enter(model, find)
        _placement.save(list(targets.values()), self.backup)
        self.held = targets
        self.state = "stored"

    def write(
        self, model: nn.Module | None, find: Callable[[], Tensors], values: Callable[[], Tensors]
    ) -> None:
        """Copy ``values()`` into ``model``'s tensors in place (``copy_to``): the stored ones where
        stored and no model is given, else ``find()``'s, FSDP2 modules resharded first."""
        if self.state == "swapped":
            raise RuntimeError(
                "copy_to() inside swapped()/use_averages() would write the averages onto "
                "themselves; call it outside the block."
            )
        if self.state == "stored" and model is None:
            targets = self.held
            _placement.reshard(self.placed)
        else:
            _placement.reshard(self._target(model))
            targets = find()
        assert targets is not None
        _placement.write([(targets[n], v) for n, v in values().items()])

    def restore(self) -> None:
        """Stored -> idle: the backup copied back into the model."""
        if self.state != "stored":
            raise RuntimeError(
                "restore() without a backup: call ema.store() before ema.copy_to(), then "
                "ema.restore() to get the trained weights back."
            )
        self._leave()

    def leave(self) -> None:
        """Back to idle from either state; a no-op if idle (``use_trained``)."""
        if self.state == "swapped":
            self.swap_out()
        elif self.state == "stored":
            self.restore()

    def bind(
        self,
        model: nn.Module | None,
        to_averages: Callable[[], None],
        to_trained: Callable[[], None],
    ) -> ModeSwitch:
        """Make the tracked module's ``eval()`` call ``to_averages`` and ``train()`` call
        ``to_trained``; the current mode applies at once. Binding twice returns the first handle."""
        target = self._target(model)
        if target is None or target is not self.model:
            raise ValueError(
                "bind_to_mode needs the module this EMA tracks; build the EMA from the module "
                "(polyak.EMA(model)) and pass that same module."
            )
        if self.mode is not None:
            return self.mode
        switch = ModeSwitch(target, to_averages, to_trained)
        target.__dict__["train"] = switch
        self.mode = switch
        if not target.training:
            to_averages()
        return switch

    def __deepcopy__(self, memo: dict[int, Any]) -> Switch:
        """A copy over the copied tensors, in the same state; never bound to a model's mode (the
        copied model's ``train`` is its own method again), refusing steps again if swapped."""
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            if key not in ("mode", "_guard"):
                clone.__dict__[key] = copy.deepcopy(value, memo)
        clone.mode = clone._guard = None
        if clone.state == "swapped":
            clone._guard = register_optimizer_step_pre_hook(
                _refuse_step_into_averages(weakref.ref(clone))
            )
        return clone
