"""The EMA's constructor arguments: each refused with a clear error before anything is built, and
the averaging rule resolved from ``decay=`` or ``rule=``.

:func:`rule_from` checks the arguments on their own and together (``stream``, ``offload`` and
``capturable`` exclude each other; ``capturable`` needs a schedule that runs on the device) and
returns the rule: ``decay=d`` is ``averagers.Exponential(d)``, ``rule=`` is taken as given, never
both. :func:`check_tracked` and :func:`check_rounding` check what the arguments ask of the tracked
tensors and their shadows, once those are known.

The decay/rule resolution lives here, not in :mod:`polyak.averagers`: the rules know weights and
steps, while ``decay=`` versus ``rule=`` (told apart by the default's identity) and what
``capturable=True`` asks of a schedule are facts of the EMA's signature.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from polyak import schedules
from polyak._tracking import dtype_name
from polyak.averagers import Exponential, Rule

__all__ = ["BUFFER_POLICIES", "DEFAULT_DECAY", "DecayLike", "check_rounding", "check_tracked"]

BUFFER_POLICIES = ("average", "copy", "none")
DecayLike = float | Callable[[int], Any]
# the default decay, told apart from a decay the caller passed (even 0.999) by identity, so that
# rule= and decay= given together are refused
DEFAULT_DECAY = 0.999


def _as_schedule(decay: DecayLike) -> Callable[[int], Any]:
    if callable(decay):
        return decay
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(
            f"decay must be a float in [0, 1] or a schedule (a callable step -> decay), got "
            f"{decay!r} of type {type(decay).__name__}; e.g. decay=0.999 or "
            f"decay=polyak.schedules.tf_warmup(0.999)."
        )
    return schedules.constant(decay)  # validates the range


def _checked_rule(rule: Rule, decay: DecayLike) -> Rule:
    """``rule`` if it is a :class:`~polyak.averagers.Rule` given without ``decay``."""
    if decay is not DEFAULT_DECAY:
        raise ValueError(
            f"decay={decay!r} and rule={rule!r} cannot be given together: the rule sets the "
            f"weights (decay=d is rule=polyak.averagers.Exponential(d)). Pass one of them."
        )
    if not isinstance(rule, Rule):
        raise TypeError(
            f"rule must be a polyak.averagers.Rule (slots, weights, advance, state_dict, "
            f"load_state_dict, map_state, read), got {rule!r} of type {type(rule).__name__}; e.g. "
            f"rule=polyak.averagers.Uniform()."
        )
    return rule


def _takes_device_steps(schedule: Callable[[int], Any]) -> bool:
    """Whether ``schedule`` is built from polyak's schedules only, which accept a step tensor."""
    if isinstance(schedule, schedules.Scaled) and callable(schedule.base):
        return _takes_device_steps(schedule.base)
    return isinstance(schedule, schedules.Schedule)


def rule_from(
    decay: DecayLike,
    rule: Rule | None,
    *,
    buffers: str,
    update_every: int,
    shadow_dtype: torch.dtype | None,
    include: Any,
    stream: str | None,
    offload: str | None,
    capturable: bool,
) -> Rule:
    """The EMA's averaging rule, once every argument here is checked (in this order: each on its
    own, then the execution policies together, then the rule and what ``capturable`` asks of it)."""
    if buffers not in BUFFER_POLICIES:
        raise ValueError(f"buffers must be one of {BUFFER_POLICIES}, got buffers={buffers!r}.")
    if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
        raise ValueError(
            f"update_every must be a positive int, got update_every={update_every!r}; "
            f"use 1 to average at every update() call."
        )
    if shadow_dtype is not None and (
        not isinstance(shadow_dtype, torch.dtype) or not shadow_dtype.is_floating_point
    ):
        raise TypeError(
            f"shadow_dtype must be a floating torch.dtype or None, got {shadow_dtype!r}; "
            f"e.g. shadow_dtype=torch.float32."
        )
    if include is not None and not callable(include):
        raise TypeError(f"include must be a predicate (name, tensor) -> bool, got {include!r}.")
    if stream not in (None, "side"):
        raise ValueError(f"stream must be None or 'side', got stream={stream!r}.")
    if offload not in (None, "cpu"):
        raise ValueError(f"offload must be None or 'cpu', got offload={offload!r}.")
    if stream is not None and offload is not None:
        raise ValueError(
            "stream='side' and offload='cpu' cannot be combined: an offloaded update already "
            "copies on a side stream. Pass one of them."
        )
    if capturable and (stream is not None or offload is not None):
        raise ValueError(
            "capturable=True runs the update in the caller's stream (inside a CUDA graph); "
            "it cannot be combined with stream='side' or offload='cpu'."
        )
    rule = Exponential(_as_schedule(decay)) if rule is None else _checked_rule(rule, decay)
    schedule = rule.decay if isinstance(rule, Exponential) else None
    if capturable and schedule is not None and not _takes_device_steps(schedule):
        raise ValueError(
            f"capturable=True evaluates the decay on the device, which a Python callable "
            f"cannot do (got {schedule!r}); use a built-in schedule from polyak.schedules, "
            f"e.g. polyak.schedules.tf_warmup(0.999)."
        )
    return rule


def check_tracked(tracked: Sequence[tuple[str, torch.Tensor, str]], capturable: bool) -> None:
    """What the arguments ask of the tracked ``(name, tensor, kind)``: at least one, and with
    ``capturable=True`` all on one device."""
    if not tracked:
        raise ValueError(
            "EMA found no tensor to track: the model has no trainable floating parameters "
            "(or include= rejected them all). Check requires_grad and the include predicate."
        )
    if capturable:
        devices = sorted({str(t.device) for _, t, _ in tracked})
        if len(devices) > 1:
            raise ValueError(
                f"capturable=True keeps one step counter and decay on one device, but the "
                f"tracked tensors are on {devices}; track each device's tensors with an EMA "
                f"of its own, or leave capturable=False."
            )


def check_rounding(rounding: str, shadows: Mapping[str, torch.Tensor]) -> None:
    """``rounding="stochastic"`` needs every averaged tensor's shadow (``shadows``) in bf16."""
    if rounding == "stochastic":
        wrong = [n for n, shadow in shadows.items() if shadow.dtype != torch.bfloat16]
        if wrong:
            raise ValueError(
                f"rounding='stochastic' needs bf16 shadows, but {wrong[:5]} have "
                f"{dtype_name(shadows[wrong[0]].dtype)} shadows; pass "
                f"shadow_dtype=torch.bfloat16."
            )
