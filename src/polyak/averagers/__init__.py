"""Averaging rules: small strategy objects the one EMA engine consumes.

A rule says which averages it keeps (its slots) and how much of the current weights enters each at
an averaging update: the lerp weight ``w`` in ``shadow += w * (param - shadow)``. It sees the
optimizer steps the update covers and its own small state (counts), nothing about tensors; it
writes its formulas once over an ``ops`` argument, which the EMA evaluates with Python numbers
(:data:`HOST`) or, for ``capturable=True``, with tensors on the device (:class:`DeviceOps`).

- :class:`Exponential`: ``w = 1 - prod(decay(n))`` over the covered steps (what ``polyak.EMA(model,
  decay)`` uses).
- :class:`Exponentials`: several exponential averages (one slot per decay) in one pass.
- :class:`Uniform`: ``w = 1 / (count + 1)``, the running mean of SWA (from a ``start`` step).
- :class:`BEMA`: an EMA with weight ``(rho + gamma t) ** -kappa`` read with the bias correction
  ``+ alpha_t (θ - θ_0)`` (Block & Zhang 2025); slots ``ema`` and ``theta0``.
- :class:`LAWA`: the mean of the latest ``k`` checkpoints, one per averaging update, in ``k``
  ring slots (Kaddour 2022; Sanyal et al. 2023). The papers keep the checkpoints on the CPU:
  ``polyak.EMA(..., offload="cpu")`` keeps every slot of any rule in (pinned) host memory.
- :class:`SwitchEMA`: :class:`Exponential` whose average is written back into the model's
  weights every ``every`` steps, ``θ ← s`` (Li et al. 2024); the rule says when
  (:meth:`SwitchEMA.switches`), the EMA writes through :mod:`polyak._placement`.
"""

from polyak.averagers._bema import BEMA
from polyak.averagers._lawa import LAWA
from polyak.averagers._ops import HOST, DeviceOps, HostOps, Ops
from polyak.averagers._rule import Exponential, Exponentials, Rule
from polyak.averagers._switch_ema import SwitchEMA
from polyak.averagers._uniform import Uniform

__all__ = [
    "BEMA",
    "HOST",
    "LAWA",
    "DeviceOps",
    "Exponential",
    "Exponentials",
    "HostOps",
    "Ops",
    "Rule",
    "SwitchEMA",
    "Uniform",
]
