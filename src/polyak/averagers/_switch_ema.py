"""Switch-EMA: an EMA whose average is written back into the model's weights every N steps."""

from __future__ import annotations

import dataclasses
from typing import Any

from polyak.averagers._ops import HOST, Ops
from polyak.averagers._rule import Exponential
from polyak.averagers._values import is_bool


@dataclasses.dataclass(frozen=True)
class SwitchEMA(Exponential):
    r"""The exponential moving average, switched into the model's weights every ``every`` steps.

    Li et al. 2024, "Switch EMA: A Free Lunch for Better Flatness and Sharpness" (arXiv
    2402.09240, SEMA): the EMA :math:`s` of the weights :math:`\theta` is kept as
    :class:`Exponential` keeps it, and after each epoch the EMA's parameters are switched into the
    model, which trains on from them while the average goes on:

    .. math::
        s \leftarrow D s + (1 - D)\, \theta, \qquad D = \prod_{n=a}^{b} d(n)
        \qquad \text{(every averaging update, steps } a..b\text{)},

        \theta \leftarrow s \qquad \text{(after the averaging update, at a switch)}.

    Switches: an averaging update covering optimizer steps :math:`a..b` (``b - a + 1 =
    update_every``; :attr:`polyak.EMA.step` counts steps from 1) switches when a multiple of
    ``every`` lies in :math:`a..b`, :math:`\lfloor b / N \rfloor > \lfloor (a - 1) / N \rfloor`
    (:math:`N` = ``every``): at steps :math:`N, 2N, ...` when ``update_every`` divides :math:`N`
    (``every = steps_per_epoch`` for the paper's epochs), else at the first averaging update at or
    after each multiple. Step 0 (construction) never switches: the shadow starts as the weights.

    What is written: the average, into every averaged tracked tensor in place, cast to its dtype
    (bf16 weights get the fp32 shadow rounded to nearest; the shadow keeps its fp32 bits). With
    ``buffers="average"`` the averaged BatchNorm statistics are written too (the whole averaged
    model enters the model); copied tensors (integer buffers, and every buffer under
    ``buffers="copy"``) already hold the model's values and are left alone; ``buffers="none"``
    touches no buffer. Only the model's tensors change: the optimizer keeps its state (momentum,
    Adam's moments).
    FSDP2 parameters get the average in their local shards, the tensors the optimizer steps.

    The rule is stateless: whether an update switches depends on the steps it covers alone, and
    the EMA's state dict holds the step, so a resumed run switches where the uninterrupted one
    would. Under ``capturable=True`` the switch is decided on the device and the write-back is
    gated there (no host sync); under ``stream="side"`` the caller's stream waits for the update
    before the write-back (device-side); under ``offload="cpu"`` the host waits for the update
    (the average is computed there) and copies it to the device at the switch steps only.

    Why a rule and not an EMA option: it is :class:`Exponential` plus one fact about each averaging
    update (whether it ends with a switch), stored with the EMA's settings like any rule's and
    evaluated by the same host/device ``ops``; the EMA does the write through
    :mod:`polyak._placement`, so the rule never sees a tensor. For epochs of varying length,
    ``ema.copy_to()`` at each epoch end with a plain EMA is the same write, by hand.

    ``decay``: a float in [0, 1] or a schedule (``step -> decay``), as for :class:`Exponential`;
    ``every``: optimizer steps between switches, an int >= 1 (steps per epoch for the paper's).
    """

    every: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        every = self.every
        if is_bool(every) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"SwitchEMA(every=...) is the number of optimizer steps between switches, an int "
                f">= 1, got every={every!r}; e.g. SwitchEMA(0.999, every=steps_per_epoch) (Li et "
                f"al. 2024 switch at each epoch's end)."
            )

    def switches(self, first: Any, last: Any, ops: Ops = HOST) -> Any:
        """Whether the averaging update covering steps ``first..last`` ends by writing the average
        into the weights: a multiple of ``every`` lies in ``first..last``. A bool on the host, a
        0-dim bool tensor on the device (``//`` of int64 tensors floors, as of ints)."""
        return last // self.every > (first - 1) // self.every
