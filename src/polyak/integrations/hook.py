"""``polyak.attach(optimizer, ema)``: the EMA updates itself after every real optimizer step.

The update runs in an optimizer post-step hook (``Optimizer.register_step_post_hook``), which
``torch.optim`` calls at the end of ``optimizer.step()``, so:

- with gradient accumulation over ``k`` micro-batches the EMA updates once per ``k`` (once per
  ``step()``), never per micro-batch or per ``backward()``;
- a step that ``torch.amp.GradScaler`` skips for inf/NaN gradients updates nothing: the scaler
  does not call ``optimizer.step()`` then, so no post-step hook runs, and every shadow and
  :attr:`polyak.EMA.step` keep their values. Optimizers that skip on the device instead
  (``fused=True``, whose ``step()`` the scaler always calls with ``optimizer.found_inf`` set) are
  recognised by that attribute: the hook reads it on the host, one sync per step, the same read
  the scaler makes for every other optimizer, and skips the update where it is set.

Several optimizers (GANs, one optimizer per parameter group):

- ``attach(opt_g, ema_g)`` and ``attach(opt_d, ema_d)``: each EMA follows its own optimizer;
- ``attach(opt_a, ema)`` and ``attach(opt_b, ema)``: ``ema`` updates after each of the two
  steps (twice per iteration if both step every iteration);
- ``attach([opt_a, opt_b], ema)``: ``ema`` updates once per *round*, on the step that completes
  it: a round ends when every optimizer in the list has taken a real step since the last update
  (an optimizer stepping twice in a round counts once; a skipped step does not count). For one
  model trained by two optimizers that both step every iteration, this is one update per
  iteration, after both halves of the model have moved.

Attaching the same EMA twice to the same optimizer is refused (it would update twice per step).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch.optim import Optimizer

__all__ = ["Attachment", "attach"]


class Updatable(Protocol):
    """What an attachment drives: :class:`polyak.EMA`, :class:`polyak.posthoc.PowerEMA`, or any
    object whose ``update()`` is to be called once per optimizer step."""

    def update(self) -> None: ...


# optimizer -> the attachments whose hooks it runs (to refuse attaching one EMA twice)
_ATTACHED: weakref.WeakKeyDictionary[Optimizer, list[Attachment]] = weakref.WeakKeyDictionary()


def _skipped_on_device(optimizer: Optimizer) -> bool:
    """Whether a ``GradScaler`` step of an optimizer that skips on the device (``fused=True``:
    ``_step_supports_amp_scaling``) found inf/NaN gradients. ``GradScaler.step`` sets
    ``optimizer.found_inf`` for the duration of that ``step()`` call only; reading it is a host
    sync, made only when it is set."""
    found_inf = getattr(optimizer, "found_inf", None)
    return isinstance(found_inf, torch.Tensor) and bool(found_inf)


class Attachment:
    """The hooks :func:`attach` registered: ``remove()`` unregisters them (idempotent).

    Also a context manager: ``with polyak.attach(opt, ema): train()`` removes the hooks on exit.
    ``optimizers`` are the optimizers whose steps make a round; ``ema`` is what they update.
    """

    def __init__(self, optimizers: tuple[Optimizer, ...], ema: Updatable) -> None:
        self.optimizers = optimizers
        self.ema = ema
        self._round = (1 << len(optimizers)) - 1  # one bit per optimizer
        self._stepped = 0  # the bits of the optimizers that have stepped in this round
        self._handles = [
            opt.register_step_post_hook(functools.partial(self._on_step, 1 << i))
            for i, opt in enumerate(optimizers)
        ]
        for opt in optimizers:
            _ATTACHED.setdefault(opt, []).append(self)

    def _on_step(self, bit: int, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if _skipped_on_device(optimizer):
            return
        self._stepped |= bit
        if self._stepped == self._round:
            self._stepped = 0
            self.ema.update()

    @property
    def removed(self) -> bool:
        """Whether :meth:`remove` was called."""
        return not self._handles

    def remove(self) -> None:
        """Unregister the hooks: later steps no longer update the EMA."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for opt in self.optimizers:
            attached = _ATTACHED.get(opt, [])
            if self in attached:
                attached.remove(self)

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = ", ".join(type(o).__name__ for o in self.optimizers)
        state = ", removed" if self.removed else ""
        return f"Attachment(optimizers=[{names}], ema={type(self.ema).__name__}{state})"


def _optimizer(obj: Any, ema: Any) -> Optimizer:
    """``obj`` as a ``torch.optim.Optimizer`` (Lightning's ``LightningOptimizer`` unwrapped)."""
    inner = getattr(obj, "_optimizer", None)  # LightningOptimizer shares the hooks of its inner
    if isinstance(inner, Optimizer):
        return inner
    if isinstance(obj, Optimizer):
        return obj
    if isinstance(ema, Optimizer) and callable(getattr(obj, "update", None)):
        raise TypeError(
            f"polyak.attach(optimizer, ema) takes the optimizer first, got the arguments the "
            f"other way round ({type(obj).__name__}, {type(ema).__name__}); call "
            f"polyak.attach(optimizer, ema)."
        )
    raise TypeError(
        f"polyak.attach expects a torch.optim.Optimizer (or a list of them), got {obj!r} of type "
        f"{type(obj).__name__}; pass the optimizer whose step() should update the EMA, e.g. "
        f"polyak.attach(opt, ema)."
    )


def attach(optimizer: Optimizer | Iterable[Optimizer], ema: Updatable) -> Attachment:
    """Call ``ema.update()`` after every real step of ``optimizer``; returns a handle with
    ``remove()``.

    ``optimizer``: one optimizer, or a list of them, whose steps are counted in rounds: the EMA
    updates once every optimizer in the list has taken a real step since its last update (see
    :mod:`polyak.integrations.hook` for several optimizers). ``ema``: a :class:`polyak.EMA` (or
    anything with ``update()``).

    What a real step is: ``optimizer.step()`` ran and did not skip. Gradient accumulation calls
    ``step()`` once per accumulated batch, so the EMA updates once per accumulated batch;
    ``torch.amp.GradScaler`` does not call ``step()`` for inf/NaN gradients, so the EMA neither
    updates nor counts the step. The update runs inside ``step()``, right after the optimizer's
    own update, as ``ema.update()`` after ``opt.step()`` would.

    Raises ``TypeError`` for arguments that are not an optimizer and an object with
    ``update()``, and ``ValueError`` for an empty or repeating list of optimizers or for an
    ``ema`` already attached to one of them.
    """
    if isinstance(optimizer, Optimizer):
        given: list[Any] = [optimizer]
    elif isinstance(optimizer, Iterable) and not isinstance(optimizer, (str, bytes)):
        given = list(optimizer)
    else:
        given = [optimizer]
    optimizers = tuple(_optimizer(o, ema) for o in given)
    if not callable(getattr(ema, "update", None)):
        raise TypeError(
            f"polyak.attach(optimizer, ema) needs an ema with an update() method (a polyak.EMA), "
            f"got {ema!r} of type {type(ema).__name__}; e.g. polyak.attach(opt, "
            f"polyak.EMA(model))."
        )
    if not optimizers:
        raise ValueError(
            "polyak.attach got an empty list of optimizers; pass the optimizer (or optimizers) "
            "whose steps should update the EMA."
        )
    if len({id(o) for o in optimizers}) != len(optimizers):
        raise ValueError(
            f"polyak.attach got the same optimizer twice in {[type(o).__name__ for o in given]}; "
            f"a round needs each optimizer once."
        )
    for opt in optimizers:
        for other in _ATTACHED.get(opt, []):
            if other.ema is ema:
                raise ValueError(
                    f"this EMA is already attached to this {type(opt).__name__} ({other!r}): a "
                    f"second attachment would update it twice per step. Call .remove() on the "
                    f"first handle before attaching again."
                )
    return Attachment(optimizers, ema)
