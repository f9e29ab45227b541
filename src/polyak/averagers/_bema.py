"""BEMA: the bias-corrected exponential moving average (Block & Zhang 2025)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from polyak.averagers._ops import HOST, Ops
from polyak.averagers._rule import Rule, _check_keys
from polyak.averagers._values import LastStep, assign, is_bool, load_int, real

T = TypeVar("T")


@dataclasses.dataclass(eq=False)
class BEMA(Rule):
    r"""Bias-corrected EMA: an EMA with a decaying weight plus a correction that removes its lag.

    Block & Zhang 2025, "EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes"
    (arXiv 2508.00180, Algorithm 1; the authors' code is github.com/abblock/bema). With
    :math:`t = n - \tau` the optimizer steps since the burn-in :math:`\tau` (``update_after``) and
    :math:`n` the last step an averaging update covers (:attr:`polyak.EMA.step`, the first update
    is step 1):

    .. math::
        \beta_t = (\rho + \gamma t)^{-\kappa}, \qquad \alpha_t = (\rho + \gamma t)^{-\eta},

        \mu^{EMA}_t = (1 - \beta_t)\, \mu^{EMA}_{t'} + \beta_t \theta_n, \qquad
        \hat\mu_t = \mu^{EMA}_t + \alpha_t (\theta - \theta_0),

    :math:`t'` the previous update's. Conventions (the paper's, pinned down here):

    - ``t`` counts optimizer steps after :math:`\tau`, from 1: the first averaging update after
      the burn-in has :math:`t = n - \tau \ge 1` and lerps by :math:`\beta_t` evaluated at its own
      ``t`` (the weight of the new iterate, *before* the update is applied: no step-0 term).
    - Burn-in: an update whose last step is :math:`n \le \tau` copies the weights into both slots
      (weight 1), so after it :math:`\mu^{EMA} = \theta_0 = \theta_n`; :math:`\theta_0` is the
      weights at the last averaging update at or before :math:`\tau` (at :math:`\tau` itself when
      it is a multiple of ``update_every``; with :math:`\tau = 0`, the weights the EMA was built
      with) and never changes after. Before and during the burn-in the read average is the
      weights themselves (:math:`\alpha = 1`: :math:`\theta_0 + (\theta - \theta_0)`).
    - Update frequency (the paper's :math:`\phi`) is the EMA's ``update_every``: one update every
      ``k`` steps lerps once by :math:`\beta_t` at its last step, as the paper does (not the
      product over the ``k`` steps, which is what :class:`Exponential` does).
    - The read (:meth:`read`) uses :math:`\alpha_t` of the last averaging update (the rule's
      state ``step``) and the weights :math:`\theta` it is given: at an averaging step that is the
      paper's :math:`\hat\mu_t` exactly; between updates (``update_every > 1``) it corrects with
      the current weights.

    Defaults are the paper's: :math:`\kappa = 0.5` (``kappa``, TRL's ``ema_power``),
    :math:`\eta = 0.2` (``eta``, ``bias_power``), :math:`\rho = 10` (``rho``, ``lag``),
    :math:`\gamma = 1` (``gamma``, ``multiplier``). ``kappa=0`` copies the weights at every update
    (:math:`\beta = 1`); ``eta=0`` corrects fully (:math:`\alpha = 1`); a large ``eta`` is plain
    EMA. ``rho + gamma >= 1`` keeps :math:`\beta_t, \alpha_t \in (0, 1]`.

    Slots: ``("ema", "theta0")``, weights :math:`(\beta_t, 0)` after the burn-in and
    :math:`(1, 1)` within it. State: ``{"step": n}``, the last step of the last averaging update
    (0 before any), from which :meth:`alpha` reads :math:`\alpha_t`.
    """

    slots: ClassVar[tuple[str, ...]] = ("ema", "theta0")
    kappa: float = 0.5
    eta: float = 0.2
    rho: float = 10.0
    gamma: float = 1.0
    update_after: int = 0
    step: Any = dataclasses.field(default=0, init=False)
    _last: LastStep = dataclasses.field(
        default_factory=LastStep, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for name in ("kappa", "eta", "rho", "gamma"):
            value = getattr(self, name)
            if is_bool(value) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"BEMA({name}=...) must be a finite number, got {name}={value!r}.")
            if value < 0:
                raise ValueError(
                    f"BEMA({name}=...) must be >= 0, got {name}={value!r}; the paper's defaults "
                    f"are kappa=0.5, eta=0.2, rho=10, gamma=1."
                )
        if self.rho + self.gamma < 1:
            raise ValueError(
                f"BEMA needs rho + gamma >= 1 (so that beta_t = (rho + gamma t)^-kappa and alpha_t "
                f"stay in (0, 1] for t >= 1), got rho={self.rho!r}, gamma={self.gamma!r}; the "
                f"paper uses rho=10, gamma=1."
            )
        tau = self.update_after
        if is_bool(tau) or not isinstance(tau, int) or tau < 0:
            raise ValueError(
                f"BEMA(update_after=...) is the burn-in in optimizer steps, an int >= 0, got "
                f"update_after={tau!r}."
            )

    def _burn_and_t(self, step: Any, to_real: Callable[[Any], Any]) -> tuple[Any, Any]:
        """``(burn, t)``: burn is 1.0 where ``step <= update_after`` else 0.0, and ``t`` is
        ``step - update_after`` after the burn-in and 1 within it (so the powers stay finite):
        arithmetic only, no branch on a device value."""
        burn = to_real(step <= self.update_after)
        return burn, to_real(step - self.update_after) * (1.0 - burn) + burn

    def weights(self, first: Any, last: Any, ops: Ops = HOST) -> tuple[Any, Any]:
        r"""``(w_ema, w_theta0)``: :math:`(\beta_t, 0)` with :math:`t = \text{last} - \tau`, or
        ``(1, 1)`` (copy into both) where ``last <= update_after``."""
        self._last.note(last)
        burn, t = self._burn_and_t(last, ops.real)
        beta = (self.rho + self.gamma * t) ** -self.kappa
        return (burn + (1.0 - burn) * beta, burn)

    def advance(self, due: Any, ops: Ops = HOST) -> None:
        """``step = last`` where ``due`` (``last`` from the :meth:`weights` of this update; on the
        device ``step += due * (last - step)``, in place)."""
        last = self._last.take(self)
        self.step = ops.add_(self.step, due * (last - self.step))

    def alpha(self) -> Any:
        r""":math:`\alpha_t` of the last averaging update (1 before the burn-in ends): a float, or
        a 0-dim float64 tensor where the state is on the device (not read on the host)."""
        burn, t = self._burn_and_t(self.step, real)
        return burn + (1.0 - burn) * (self.rho + self.gamma * t) ** -self.eta

    def read(self, averages: Sequence[T], current: T) -> T:
        r""":math:`\mu^{EMA} + \alpha_t (\theta - \theta_0)` from ``averages = [ema, theta0]`` and
        ``current`` :math:`= \theta`: a new tensor."""
        ema, theta0 = averages
        return ema + self.alpha() * (current - theta0)  # type: ignore[operator]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take ``{"step": n}``, ``n`` an int >= 0 (or a 0-dim integer tensor)."""
        _check_keys(self, state, ("step",))
        step = load_int(self, "step", state["step"], "the last step of the last averaging update")
        self.step = assign(self.step, step)

    def map_state(self, fn: Callable[[Any], Any]) -> None:
        self.step = fn(self.step)
