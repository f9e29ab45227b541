"""Decay schedules: pure functions from the update step to the decay.

Every factory returns a small frozen dataclass with ``__call__(step) -> decay``. A schedule knows
steps and floats, nothing else: it holds no tensors and no state, so it can be stored in a state
dict as plain data (:func:`to_state`, :func:`from_state`).

``step`` is what :attr:`polyak.EMA.step` counts: calls of ``update()``, one per optimizer step,
incremented *before* the schedule is evaluated, so the first update sees ``step = 1``. (optax passes
the count before the increment; we follow TF's ``num_updates=global_step`` read after the optimizer
step, and torch_ema.) The built-ins also accept a 0-dim tensor step (for updates captured in CUDA
graphs); they never convert it to a Python number, so they never synchronise the host.

The decay ``d`` is the weight kept by the old average in ``shadow = d * shadow + (1 - d) * param``.
A half-life of ``h`` steps means ``d ** h == 0.5``.

Examples:
    >>> from polyak import schedules
    >>> schedules.constant(0.999)(10)
    0.999
    >>> round(schedules.tf_warmup(0.99)(1), 6)
    0.181818
    >>> schedules.half_life(steps=1)(5)
    0.5
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

__all__ = [
    "AnytimeHalfLife",
    "Constant",
    "Delayed",
    "HalfLife",
    "InverseGamma",
    "Power",
    "Scaled",
    "Schedule",
    "TFWarmup",
    "anytime_half_life",
    "constant",
    "delayed",
    "factories",
    "from_state",
    "gamma_to_sigma_rel",
    "half_life",
    "inverse_gamma",
    "parse",
    "power",
    "scaled",
    "sigma_rel_to_gamma",
    "tf_warmup",
    "to_state",
]

Step = Any  # an int, or a 0-dim tensor (duck-typed: schedules never import torch)


def _check_decay(value: float, name: str = "decay") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a float in [0, 1], got {value!r} of type {type(value).__name__}; "
            f"pass a number such as 0.999, or a schedule (a callable step -> decay)."
        )
    value = float(value)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(
            f"{name} must be in [0, 1], got {name}={value!r}. A decay is the weight kept by the old "
            f"average; typical values are 0.99 to 0.9999 (1 freezes the average, 0 copies the weights)."
        )
    return value


def _check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {name}={value!r}.")
    return float(value)


def _minimum(x: Any, bound: float) -> Any:
    """min(x, bound) for a float or a tensor, without reading the tensor on the host."""
    return x.clamp(max=bound) if hasattr(x, "clamp") else min(x, bound)


def _clamp(x: Any, lo: float, hi: float) -> Any:
    return x.clamp(min=lo, max=hi) if hasattr(x, "clamp") else min(max(x, lo), hi)


def _at_least_one(step: Step) -> Any:
    return step.clamp(min=1) if hasattr(step, "clamp") else max(step, 1)


class Schedule:
    """Base class of the built-in schedules: a frozen dataclass that maps a step to a decay."""

    name: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type[Schedule]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            Schedule._registry[cls.name] = cls

    def __call__(self, step: Step) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Constant(Schedule):
    r"""A constant decay: :math:`d(n) = d` for every step :math:`n`."""

    name: ClassVar[str] = "constant"
    decay: float

    def __post_init__(self) -> None:
        _check_decay(self.decay)

    def __call__(self, step: Step) -> float:
        return self.decay


@dataclasses.dataclass(frozen=True)
class TFWarmup(Schedule):
    r"""TensorFlow's ``num_updates`` warm-up: :math:`d(n) = \min(d, \frac{1 + n}{10 + n})`.

    At step 1 the decay is 2/11 ≈ 0.18, so early averages follow the weights closely instead of
    staying near the random initialisation; from :math:`n = (10d - 1)/(1 - d)` on, the decay is ``d``
    (step 890 for 0.99, step 8,990 for 0.999). ``tf.train.ExponentialMovingAverage(d, num_updates=n)``
    computes this in float32; :mod:`polyak.tf` reproduces that bit for bit, this schedule computes it
    in double precision.
    """

    name: ClassVar[str] = "tf_warmup"
    decay: float

    def __post_init__(self) -> None:
        _check_decay(self.decay)

    def __call__(self, step: Step) -> Any:
        return _minimum((1 + step) / (10 + step), self.decay)


@dataclasses.dataclass(frozen=True)
class InverseGamma(Schedule):
    r"""Inverse-gamma warm-up: :math:`d(n) = 1 - (1 + n / \gamma_{inv})^{-p}`, clamped to
    ``[min_decay, max_decay]``.

    With ``power=2/3`` the average keeps about :math:`\propto n^{2/3}` effective samples (good for
    runs of ~1M steps); ``power=3/4`` suits shorter runs. Step 0 gives ``min_decay``.
    """

    name: ClassVar[str] = "inverse_gamma"
    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0
    min_decay: float = 0.0
    max_decay: float = 0.9999

    def __post_init__(self) -> None:
        _check_positive(self.inv_gamma, "inv_gamma")
        _check_positive(self.power, "power")
        _check_decay(self.min_decay, "min_decay")
        _check_decay(self.max_decay, "max_decay")
        if self.min_decay > self.max_decay:
            raise ValueError(
                f"min_decay must not exceed max_decay, got min_decay={self.min_decay!r} > "
                f"max_decay={self.max_decay!r}."
            )

    def __call__(self, step: Step) -> Any:
        value = 1 - (1 + step / self.inv_gamma) ** -self.power
        return _clamp(value, self.min_decay, self.max_decay)


@dataclasses.dataclass(frozen=True)
class HalfLife(Schedule):
    r"""A constant decay given by its half-life in steps: :math:`d = 0.5^{1 / h}`.

    After ``h`` updates the old average keeps half its weight: :math:`d^h = 0.5`.
    """

    name: ClassVar[str] = "half_life"
    steps: float

    def __post_init__(self) -> None:
        _check_positive(self.steps, "steps")

    @property
    def decay(self) -> float:
        return 0.5 ** (1.0 / self.steps)

    def __call__(self, step: Step) -> float:
        return self.decay


@dataclasses.dataclass(frozen=True)
class Power(Schedule):
    r"""EDM2's power-function average (Karras et al. 2024, eq. 3): :math:`d(n) = (1 - 1/n)^{\gamma + 1}`.

    After :math:`n` updates the average weighs the weights of step :math:`i` by
    :math:`\propto i^\gamma`: the average's length grows with training. The first update
    (:math:`n = 1`) has decay 0, so the average starts at the weights; steps below 1 are treated as 1.
    ``sigma_rel`` (the relative standard deviation of the weighting, EDM2 eq. 4) is the
    scale-free way to say it: ``sigma_rel=0.10`` is ``gamma≈6.94``, ``0.05`` is ``gamma≈16.97``.
    """

    name: ClassVar[str] = "power"
    gamma: float

    def __post_init__(self) -> None:
        if (
            isinstance(self.gamma, bool)
            or not isinstance(self.gamma, (int, float))
            or not (self.gamma > -1)
        ):
            raise ValueError(
                f"gamma must be a number > -1, got gamma={self.gamma!r}; EDM2 uses about 5 to 20 "
                f"(or pass sigma_rel=0.05 to 0.15)."
            )

    @property
    def sigma_rel(self) -> float:
        return gamma_to_sigma_rel(self.gamma)

    def __call__(self, step: Step) -> Any:
        return (1 - 1 / _at_least_one(step)) ** (self.gamma + 1)


@dataclasses.dataclass(frozen=True)
class Scaled(Schedule):
    r"""The batch-size scaling rule: :math:`d'(n) = d(n)^\kappa`.

    Training with a batch ``kappa`` times larger takes ``kappa`` times fewer steps; raising the decay
    to the power ``kappa`` keeps the averaging horizon the same in samples (Busbridge et al. 2023,
    "How to scale your EMA"). ``base`` is a float or another schedule.
    """

    name: ClassVar[str] = "scaled"
    base: float | Callable[[Step], Any]
    kappa: float

    def __post_init__(self) -> None:
        if not callable(self.base):
            _check_decay(self.base, "base")
        _check_positive(self.kappa, "kappa")

    def __call__(self, step: Step) -> Any:
        base = self.base(step) if callable(self.base) else self.base
        return base**self.kappa


@dataclasses.dataclass(frozen=True)
class Delayed(Schedule):
    r"""A start delay: decay 0 for the first ``after`` steps, then ``base`` restarted from step 1.

    .. math:: d(n) = 0 \text{ for } n \le N, \qquad d(n) = d_{base}(n - N) \text{ for } n > N,

    with :math:`N` = ``after`` and :math:`n` the step (:attr:`polyak.EMA.step`, the first update is
    step 1). With decay 0 the shadows copy the weights, so after step :math:`N` the average is
    :math:`\theta_N` and from then on it is the ``base`` average of an EMA built after step
    :math:`N` (a warm-up such as :func:`tf_warmup` or :func:`power` starts over at step
    :math:`N + 1`). This is the ``update_after_step`` of ema-pytorch and of Lightning's EMA
    callbacks: averaging the first, fast-moving steps only lags the average behind. ``base`` is a
    float or another schedule; ``after=0`` is ``base`` itself.
    """

    name: ClassVar[str] = "delayed"
    base: float | Callable[[Step], Any]
    after: int

    def __post_init__(self) -> None:
        if not callable(self.base):
            _check_decay(self.base, "base")
        if isinstance(self.after, bool) or not isinstance(self.after, int) or self.after < 0:
            raise ValueError(
                f"after must be an int >= 0 (the steps before averaging starts), got "
                f"after={self.after!r}; e.g. delayed(0.999, after=1000)."
            )

    def __call__(self, step: Step) -> Any:
        since = step - self.after  # steps since the delay: 1 at the first averaged step
        base = self.base(_at_least_one(since)) if callable(self.base) else self.base
        return base * _clamp(since, 0, 1)  # times 0 up to the delay, 1 after (in step's dtype)


@dataclasses.dataclass(frozen=True)
class AnytimeHalfLife(Schedule):
    r"""A half-life that grows with training, a fraction :math:`f` of the steps so far:
    :math:`d(n) = 2^{-1 / (f n)}`, so that :math:`d(n)^{f n} = 1/2`.

    Meterez, Nair, Morwani, Pehlevan & Kakade 2026, "Anytime Pretraining: Horizon-Free
    Learning-Rate Schedules with Weight Averaging" (arXiv 2602.03702): an EMA whose half-life is a
    fixed fraction of the current step needs no training horizon, and with a constant or
    :math:`1/\sqrt{t}` learning rate matches a tuned cosine schedule at every point of training.
    At step :math:`n` the average weighs the last :math:`f n` steps by half of its weight (``f=0.1``
    at step 10,000: a half-life of 1,000 steps). Steps below 1 are treated as 1 (the first update
    has half-life ``f`` steps: with ``f < 1`` the average nearly starts at the weights).
    """

    name: ClassVar[str] = "anytime_half_life"
    fraction: float

    def __post_init__(self) -> None:
        _check_positive(self.fraction, "fraction")

    def __call__(self, step: Step) -> Any:
        return 0.5 ** (1.0 / (self.fraction * _at_least_one(step)))


def constant(decay: float) -> Constant:
    """A constant decay ``d`` (see :class:`Constant`)."""
    return Constant(decay)


def tf_warmup(decay: float) -> TFWarmup:
    """``min(decay, (1 + n) / (10 + n))``, TF's ``num_updates`` rule (see :class:`TFWarmup`)."""
    return TFWarmup(decay)


def inverse_gamma(
    inv_gamma: float = 1.0,
    power: float = 2.0 / 3.0,
    max_decay: float = 0.9999,
    min_decay: float = 0.0,
) -> InverseGamma:
    """``1 - (1 + n / inv_gamma) ** -power`` clamped to ``[min_decay, max_decay]``."""
    return InverseGamma(inv_gamma=inv_gamma, power=power, min_decay=min_decay, max_decay=max_decay)


def half_life(
    steps: float | None = None, *, samples: float | None = None, batch_size: int | None = None
) -> HalfLife:
    """A constant decay ``0.5 ** (1 / steps)`` from a half-life in steps, or in samples.

    ``half_life(samples=s, batch_size=b)`` is ``half_life(steps=s / b)``: the half-life stays fixed
    in samples when the batch size changes (EDM2 states its averages this way).
    """
    if samples is not None or batch_size is not None:
        if steps is not None:
            raise ValueError(
                f"give the half-life either in steps or in samples, got steps={steps!r} and "
                f"samples={samples!r}; pass one of them."
            )
        if samples is None or batch_size is None:
            raise ValueError(
                f"a half-life in samples needs both samples and batch_size, got samples={samples!r}, "
                f"batch_size={batch_size!r}."
            )
        steps = _check_positive(samples, "samples") / _check_positive(batch_size, "batch_size")
    if steps is None:
        raise ValueError("half_life needs steps=... (or samples=... with batch_size=...).")
    return HalfLife(steps)


def power(gamma: float | None = None, *, sigma_rel: float | None = None) -> Power:
    """EDM2's ``(1 - 1/n) ** (gamma + 1)``, from ``gamma`` or from ``sigma_rel``."""
    if (gamma is None) == (sigma_rel is None):
        raise ValueError(
            f"power() takes exactly one of gamma and sigma_rel, got gamma={gamma!r}, "
            f"sigma_rel={sigma_rel!r}; e.g. power(sigma_rel=0.10) or power(gamma=6.94)."
        )
    if sigma_rel is not None:
        gamma = sigma_rel_to_gamma(sigma_rel)
    return Power(gamma)


def scaled(base: float | Callable[[Step], Any], kappa: float) -> Scaled:
    """``base ** kappa`` (``base`` a float or a schedule), the batch-size scaling rule."""
    return Scaled(base, kappa)


def delayed(base: float | Callable[[Step], Any], after: int) -> Delayed:
    """Decay 0 (copy the weights) for the first ``after`` steps, then ``base`` from its step 1
    (ema-pytorch's ``update_after_step``; see :class:`Delayed`)."""
    return Delayed(base, after)


def anytime_half_life(fraction: float) -> AnytimeHalfLife:
    """``0.5 ** (1 / (fraction * n))``: a half-life of ``fraction`` times the steps so far
    (Meterez et al. 2026; see :class:`AnytimeHalfLife`)."""
    return AnytimeHalfLife(fraction)


def gamma_to_sigma_rel(gamma: float) -> float:
    r""":math:`\sigma_{rel} = (\gamma + 1)^{1/2} (\gamma + 2)^{-1} (\gamma + 3)^{-1/2}` (EDM2 eq. 4)."""
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    r"""Inverse of :func:`gamma_to_sigma_rel`: the largest real root of
    :math:`\gamma^3 + 7\gamma^2 + (16 - t)\gamma + (12 - t) = 0` with :math:`t = \sigma_{rel}^{-2}`.
    """
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)):
        raise TypeError(f"sigma_rel must be a float, got {sigma_rel!r}.")
    # sigma_rel(gamma) rises from 0 at gamma = -1 to its peak at gamma* = (sqrt(5) - 3) / 2 (the
    # root of gamma^2 + 3 gamma + 1, where d/dgamma log sigma_rel = 0), then falls to 0: the largest
    # root (EDM2's choice) is the one on the falling branch.
    peak = (math.sqrt(5.0) - 3.0) / 2.0
    top = gamma_to_sigma_rel(peak)
    if not 0 < sigma_rel <= top:
        raise ValueError(
            f"sigma_rel must be in (0, {top:.4f}], got sigma_rel={sigma_rel!r}; "
            f"EDM2 uses 0.05 to 0.15."
        )
    lo, hi = peak, 1.0
    while gamma_to_sigma_rel(hi) > sigma_rel:
        hi *= 2
    for _ in range(200):  # bisection on the monotone branch: cannot fail to converge
        mid = 0.5 * (lo + hi)
        if gamma_to_sigma_rel(mid) > sigma_rel:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def factories() -> dict[str, Callable[..., Schedule]]:
    """The schedule factories of this module by name: its public functions returning a Schedule."""
    found = {}
    for name in __all__:
        obj = globals()[name]
        if not name[:1].islower() or not inspect.isfunction(obj):
            continue
        returns = inspect.signature(obj).return_annotation
        returns = globals().get(returns) if isinstance(returns, str) else returns
        # a concrete schedule class (parse() returns the base class and is not a factory)
        if isinstance(returns, type) and issubclass(returns, Schedule) and returns is not Schedule:
            found[name] = obj
    return found


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse(spec: str) -> Schedule:
    """Build a decay schedule from ``NAME[:key=value,...]``, e.g. ``power:sigma_rel=0.1``.

    ``NAME`` is a factory of :mod:`polyak.schedules` and each ``key=value`` one of its keyword
    arguments; values are read as ints where they look like ints, otherwise as floats. The
    result is ``getattr(polyak.schedules, NAME)(**kwargs)``.

    Raises:
        ValueError: unknown name or key (the message lists the valid ones), a value that is not
            a number, or arguments the factory rejects.

    Example:
        >>> parse("tf_warmup:decay=0.99")(1)  # (1 + 1) / (10 + 1)
        0.18181818181818182
    """
    known = factories()
    name, _, args = spec.partition(":")
    name = name.strip()
    if name not in known:
        raise ValueError(
            f"unknown schedule {name!r} in --schedule {spec!r}; valid names: "
            f"{', '.join(sorted(known))}. Write NAME[:key=value,...], e.g. "
            "power:sigma_rel=0.1 or tf_warmup:decay=0.999."
        )
    factory = known[name]
    keys = [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    kwargs: dict[str, int | float] = {}
    for item in filter(None, (part.strip() for part in args.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not value:
            raise ValueError(
                f"--schedule {spec!r}: {item!r} is not key=value; write e.g. "
                f"{name}:{keys[0] if keys else 'key'}=0.999."
            )
        if key not in keys:
            raise ValueError(
                f"--schedule {spec!r}: {name} has no argument {key!r}; valid keys: "
                f"{', '.join(keys) or '(none)'}."
            )
        if key in kwargs:
            raise ValueError(f"--schedule {spec!r}: {key!r} is given twice.")
        try:
            kwargs[key] = _number(value)
        except ValueError:
            raise ValueError(
                f"--schedule {spec!r}: {key}={value!r} is not a number; values are ints or floats."
            ) from None
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"--schedule {spec!r}: {error}") from error


def to_state(schedule: Callable[[Step], Any]) -> dict[str, Any]:
    """A built-in schedule as plain data (str/float/dict), for state dicts.

    A user's own callable cannot be stored: it becomes ``{"name": "callable", "repr": ...}`` and must
    be passed again to the EMA that loads the state. So does a built-in schedule around one (e.g.
    ``scaled(my_fn, kappa=4)``): half of it could not be rebuilt, so none of it is stored.
    """
    if isinstance(schedule, Schedule) and schedule.name:
        data: dict[str, Any] = {"name": schedule.name}
        for field in dataclasses.fields(schedule):
            value = getattr(schedule, field.name)
            if callable(value):
                value = to_state(value)
                if value["name"] == "callable":
                    return {"name": "callable", "repr": repr(schedule)}
            data[field.name] = value
        return data
    return {"name": "callable", "repr": repr(schedule)}


def from_state(data: Mapping[str, Any]) -> Schedule | None:
    """The schedule :func:`to_state` stored, or ``None`` where a user callable must be passed again.

    ``None`` also for a built-in schedule stored around a user callable (as older versions wrote
    ``scaled(my_fn, ...)``: ``{"name": "scaled", "base": {"name": "callable", ...}, ...}``).
    """
    name = data.get("name")
    if name == "callable":
        return None
    cls = Schedule._registry.get(name)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(
            f"unknown schedule {name!r} in state; known: {sorted(Schedule._registry)}."
        )
    kwargs = {}
    for key, value in data.items():
        if key == "name":
            continue
        if isinstance(value, Mapping):
            value = from_state(value)
            if value is None:  # built around a user callable: the caller passes it again
                return None
        kwargs[key] = value
    return cls(**kwargs)
