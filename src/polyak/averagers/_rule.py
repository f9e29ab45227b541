"""The rule interface and the exponential rule."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from polyak import schedules
from polyak.averagers._ops import HOST, Ops

T = TypeVar("T")


@runtime_checkable
class Rule(Protocol):
    r"""An averaging rule: the averages it keeps, their weights at each update, its state, its read.

    A rule keeps ``N = len(slots)`` averages of every tracked tensor (its *slots*). At an averaging
    update that covers optimizer steps :math:`a..b` (``b - a + 1 = update_every``), slot :math:`k`
    moves towards the weights :math:`\theta` by its weight :math:`w_k`:

    .. math:: s_k \leftarrow s_k + w_k\, (\theta - s_k) \qquad (\text{``s_k.lerp_(θ, w_k)``})

    - :meth:`weights` gives :math:`(w_0, ..., w_{N-1})`, written once over an ``ops`` argument
      (:mod:`polyak.averagers._ops`): :data:`~polyak.averagers.HOST` (steps and counts are Python
      ints, weights Python floats) for an ordinary update, :class:`~polyak.averagers.DeviceOps`
      (0-dim int64/float64 tensors on the device, torch ops only, no host sync) for
      ``capturable=True``. A capturable EMA evaluates it at every call, also off the averaging
      steps (the update is then skipped), so it must be finite there too.
    - :meth:`advance` moves the rule's own state past one update: the host calls it after each
      averaging update with ``due=True``; the device at every call with ``due`` a bool tensor
      (``True`` on the averaging steps), so state changes must be written as ``ops.add_(x, due)``
      and the like, never as a Python ``if``.
    - :meth:`state_dict` / :meth:`load_state_dict`: that state as plain data (ints, floats, or
      0-dim tensors where a capturable EMA keeps it on the device); :meth:`map_state` lets the
      EMA move it (``fn`` maps each value, e.g. onto the device).
    - :meth:`read` is how an average is read from the slots of one tensor: the identity
      ``averages[0]`` by default. A rule whose average is a formula of its slots overrides it
      (BEMA: :math:`s + \alpha_t (\theta_t - \theta_0)` with :math:`\theta_0` a slot; LAWA: the
      mean of its K ring slots).
    - ``switches(first, last, ops)``, optional (not part of the protocol's checked members): a
      rule that has it is asked, after each averaging update, whether the update ends by writing
      its average (its :meth:`read`, which must then be one of its slots as is) into the model's
      weights; a bool on the host, a 0-dim bool tensor on the device
      (:class:`~polyak.averagers.SwitchEMA`). Rules without it never write.

    A rule never sees tensors of weights: it gives numbers, the kernels lerp. Subclass it to
    inherit the defaults of a stateless one-slot rule.
    """

    slots: ClassVar[tuple[str, ...]]

    def weights(self, first: Any, last: Any, ops: Ops = HOST) -> tuple[Any, ...]:
        """``(w_0, ..., w_{N-1})`` for the averaging update covering steps ``first..last``."""
        ...

    def advance(self, due: Any, ops: Ops = HOST) -> None:
        """Move the rule's state past one update (only where ``due``); stateless rules: nothing."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The rule's state as plain data (ints, floats, 0-dim tensors); ``{}`` if it has none."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take :meth:`state_dict` output; a stateless rule takes ``{}`` only."""
        _check_keys(self, state, ())

    def map_state(self, fn: Callable[[Any], Any]) -> None:
        """Replace every state value ``v`` by ``fn(v)`` (e.g. to put it on a device)."""
        return None

    def read(self, averages: Sequence[T], current: T) -> T:
        """The average of one tensor, from its slots' shadows ``averages`` and its current value
        ``current``: ``averages[0]`` itself (no copy) unless a rule reads otherwise."""
        return averages[0]


def _check_keys(rule: Any, state: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{type(rule).__name__}.load_state_dict takes a mapping (the output of state_dict()), "
            f"got {state!r} of type {type(state).__name__}."
        )
    missing = [k for k in keys if k not in state]
    unexpected = [k for k in state if k not in keys]
    if missing or unexpected:
        raise ValueError(
            f"{type(rule).__name__}.load_state_dict: expected the keys {list(keys)}, got "
            f"{list(state)} (missing {missing}, unexpected {unexpected}); pass the output of "
            f"{type(rule).__name__}.state_dict()."
        )


@dataclasses.dataclass(frozen=True)
class Exponential(Rule):
    r"""The exponential moving average with a (possibly scheduled) decay :math:`d(n)`.

    One averaging update covering optimizer steps :math:`a..b` (``b - a + 1 = update_every``) uses

    .. math:: s \leftarrow D s + (1 - D) \theta, \qquad D = \prod_{n=a}^{b} d(n),

    so averaging every :math:`k` steps keeps the horizon in optimizer steps (``d ** k`` for a
    constant decay). With ``update_every=1`` this is ``s = d(n) s + (1 - d(n)) θ``, and after
    :math:`N` updates with constant :math:`d` from :math:`s_0 = \theta_0`:
    :math:`s_N = d^N \theta_0 + (1 - d) \sum_{i<N} d^i \theta_{N-i}`.

    ``decay`` is a schedule (a callable ``step -> decay``, see :mod:`polyak.schedules`) or a float
    (made ``schedules.constant(decay)``). One slot, no state: the weight depends on the steps only.
    """

    slots: ClassVar[tuple[str, ...]] = ("ema",)
    decay: Callable[[int], Any]

    def __post_init__(self) -> None:
        if not callable(self.decay):  # a float: the constant schedule (which checks the range)
            object.__setattr__(self, "decay", schedules.constant(self.decay))

    def weights(self, first: Any, last: Any, ops: Ops = HOST) -> tuple[Any]:
        """``(1 - prod(decay(n) for n in first..last),)``; on the host each decay is checked to be
        a float in [0, 1] (a ValueError names the step)."""
        decays = ops.map(self.decay, first, last, check=self._check)
        return (1.0 - ops.prod(decays),)

    def _check(self, value: Any, step: int) -> None:
        if not (isinstance(value, numbers.Real) and 0.0 <= value <= 1.0):
            raise ValueError(
                f"the decay schedule {self.decay!r} returned {value!r} at step {step}; a decay "
                f"must be a float in [0, 1]. Fix the schedule (or clamp its output)."
            )

    def weight(self, first_step: int, last_step: int) -> float:
        """The one slot's weight on the host: ``weights(first_step, last_step)[0]``."""
        return self.weights(first_step, last_step)[0]


@dataclasses.dataclass(frozen=True)
class Exponentials(Rule):
    r"""Several exponential moving averages of the same weights, one slot per decay, in one pass.

    Slot :math:`k` is :class:`Exponential` with decay :math:`d_k(n)`: an averaging update covering
    optimizer steps :math:`a..b` uses

    .. math:: s_k \leftarrow D_k s_k + (1 - D_k) \theta, \qquad D_k = \prod_{n=a}^{b} d_k(n),

    bit for bit what ``polyak.EMA(model, d_k)`` computes, but every weight is read once per update
    for all slots (the kernels take N slots): two averages cost 20 bytes of traffic per fp32
    element instead of 24. Use it to keep a short and a long average, or EDM2's power averages
    (``decays=[schedules.power(sigma_rel=s) for s in (0.05, 0.10)]``) for post-hoc EMA.

    ``decays``: floats in [0, 1] or schedules (``step -> decay``), one per slot. ``names``: the
    slots' names (what ``ema.average(name, slot=...)``, ``ema.swapped(slot=...)`` and the state
    dict use); by default ``"ema0"``, ``"ema1"``, ... Reading without a slot reads the first.
    """

    decays: tuple[Callable[[int], Any], ...]
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        decays = self.decays
        if callable(decays) or isinstance(decays, (str, bytes, numbers.Real)):
            raise TypeError(
                f"decays must be a sequence of decays (floats in [0, 1] or schedules), one per "
                f"slot, got {decays!r}; e.g. Exponentials(decays=(0.99, 0.9999))."
            )
        decays = tuple(d if callable(d) else schedules.constant(d) for d in decays)
        if not decays:
            raise ValueError("decays must hold at least one decay, got an empty sequence.")
        object.__setattr__(self, "decays", decays)
        object.__setattr__(self, "_each", tuple(Exponential(d) for d in decays))
        if self.names is not None:
            names = tuple(self.names)
            if (
                len(names) != len(decays)
                or len(set(names)) != len(names)
                or not all(isinstance(n, str) and n for n in names)
            ):
                raise ValueError(
                    f"names must be {len(decays)} distinct non-empty strings, one per decay, got "
                    f"names={self.names!r}; e.g. names=('fast', 'slow')."
                )
            object.__setattr__(self, "names", names)

    @property
    def slots(self) -> tuple[str, ...]:  # type: ignore[override]
        """``names``, or ``("ema0", "ema1", ...)``."""
        if self.names is not None:
            return self.names
        return tuple(f"ema{k}" for k in range(len(self.decays)))

    def weights(self, first: Any, last: Any, ops: Ops = HOST) -> tuple[Any, ...]:
        """``(1 - prod(d_k(n) for n in first..last) for each k)``; on the host each decay is
        checked to be a float in [0, 1]."""
        return tuple(rule.weights(first, last, ops)[0] for rule in self._each)  # type: ignore[attr-defined]
